//! Required attributes are checked by shape inference, so the verifier (which runs it)
//! rejects a node without one at load time, not the interpreter at run time: for every op,
//! whenever a shape rule accepts a node without attributes, the reference semantics must
//! not then fail for a missing attribute.

use kiln_ir::ops::{eval, infer};
use kiln_ir::{Attrs, DType, Fact, OpKind, Tensor, TensorData};
use std::sync::Arc;

fn tensor(dtype: DType, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let vals = (0..n as i64).map(|i| (i % 3) + 1);
    Tensor::new(dims.to_vec(), TensorData::from_i64s(dtype, vals)).expect("sized from dims")
}

fn fact(t: &Tensor) -> Fact {
    let mut f = Fact::of(kiln_ir::TensorType::new(
        t.dtype(),
        kiln_ir::Shape::fixed(t.shape()),
    ));
    f.konst = Some(Arc::new(t.clone()));
    f
}

#[test]
fn a_missing_required_attribute_is_a_shape_inference_error() {
    let shapes: [&[usize]; 5] = [&[4], &[2, 3], &[1, 2, 4, 4], &[2, 3, 4], &[]];
    let mut gaps = vec![];
    for &op in OpKind::ALL {
        if !op.takes_attrs() {
            continue;
        }
        let n = op.arity().min.clamp(1, 9);
        for dtype in [DType::F32, DType::I64] {
            for dims in shapes {
                let ts: Vec<Tensor> = (0..n).map(|_| tensor(dtype, dims)).collect();
                let facts: Vec<Fact> = ts.iter().map(fact).collect();
                let fin: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
                if infer(op, &Attrs::new(), &fin).is_err() {
                    continue;
                }
                let tin: Vec<Option<&Tensor>> = ts.iter().map(Some).collect();
                if let Err(e) = eval(op, &Attrs::new(), &tin) {
                    if e.contains("missing attribute") {
                        gaps.push(format!("{} {dtype}{dims:?}: {e}", op.name()));
                    }
                }
            }
        }
    }
    assert!(
        gaps.is_empty(),
        "shape rules accept these nodes but evaluation needs an attribute:\n{}",
        gaps.join("\n")
    );
}
