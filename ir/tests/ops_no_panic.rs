//! Robustness of the elementwise, reduce, nn, linalg and pool families: shape rules and
//! reference semantics return `Err` on nonsense (bad ranks, attributes, dtypes), never panic.

use kiln_ir::ops::{eval, infer, Family};
use kiln_ir::{Attr, Attrs, DType, Fact, OpKind, Shape, Tensor, TensorData, TensorType};
use proptest::prelude::*;

fn my_ops() -> Vec<OpKind> {
    OpKind::ALL
        .iter()
        .copied()
        .filter(|o| {
            matches!(
                o.family(),
                Family::Elementwise | Family::Reduce | Family::Nn | Family::Linalg | Family::Pool
            )
        })
        .collect()
}

fn tensor(dtype: u8, dims: &[usize], seed: i64) -> Tensor {
    let n: usize = dims.iter().product();
    let dt = [
        DType::F32,
        DType::I32,
        DType::Bool,
        DType::I64,
        DType::F16,
        DType::U8,
    ][dtype as usize % 6];
    let vals = (0..n as i64).map(|i| ((i * 7 + seed) % 11) - 5);
    Tensor::new(dims.to_vec(), TensorData::from_i64s(dt, vals)).expect("sized from dims")
}

fn attrs(pick: &[i64]) -> Attrs {
    let mut a = Attrs::new();
    let p = |i: usize| pick[i % pick.len()];
    if p(0) % 2 == 0 {
        a.set("axis", Attr::Int(p(1) % 4));
    }
    if p(2) % 3 == 0 {
        a.set(
            "kernel_shape",
            Attr::Ints(vec![p(3) % 3 + 1; p(4).rem_euclid(3) as usize]),
        );
    }
    if p(5) % 3 == 0 {
        a.set(
            "strides",
            Attr::Ints(vec![p(6) % 3; p(7).rem_euclid(3) as usize]),
        );
    }
    if p(8) % 3 == 0 {
        a.set(
            "pads",
            Attr::Ints(vec![p(9) % 3; p(10).rem_euclid(5) as usize]),
        );
    }
    if p(11) % 3 == 0 {
        a.set("group", Attr::Int(p(12) % 3));
    }
    if p(13) % 2 == 0 {
        a.set("keepdims", Attr::Int(p(14) % 2));
    }
    if p(15) % 3 == 0 {
        a.set("ceil_mode", Attr::Int(1));
    }
    if p(16) % 4 == 0 {
        a.set(
            "equation",
            Attr::Str(
                ["ij,jk->ik", "...i->i", "ii", "i,i", "a.b"][p(17).rem_euclid(5) as usize].into(),
            ),
        );
    }
    if p(18) % 4 == 0 {
        a.set("num_groups", Attr::Int(p(19) % 3));
    }
    if p(20) % 4 == 0 {
        a.set("size", Attr::Int(p(21) % 4));
    }
    a.set("to", Attr::Str("i64".into()));
    a
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    #[test]
    fn family_ops_never_panic(
        op_i in 0usize..200,
        shapes in proptest::collection::vec((0u8..6, proptest::collection::vec(0usize..4, 0..5)), 0..5),
        pick in proptest::collection::vec(-3i64..6, 22),
    ) {
        let ops = my_ops();
        let op = ops[op_i % ops.len()];
        let a = attrs(&pick);
        let ts: Vec<Tensor> = shapes.iter().enumerate().map(|(i, (d, s))| tensor(*d, s, i as i64)).collect();
        let refs: Vec<Option<&Tensor>> = ts.iter().map(Some).collect();
        let r = std::panic::catch_unwind(|| eval(op, &a, &refs).map(|_| ()));
        prop_assert!(r.is_ok(), "eval of {} panicked on {:?} with {:?}", op.name(),
            ts.iter().map(|t| (t.dtype(), t.shape().to_vec())).collect::<Vec<_>>(), a);
        let facts: Vec<Fact> = ts.iter().map(|t| Fact::of(TensorType::new(t.dtype(), Shape::fixed(t.shape())))).collect();
        let frefs: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
        let r = std::panic::catch_unwind(|| infer(op, &a, &frefs).map(|_| ()));
        prop_assert!(r.is_ok(), "infer of {} panicked", op.name());
    }
}
