//! `cast` between any two dtypes natively, element by element with the interpreter's own
//! conversions (`Elem::to_f64`/`from_f64` where either side is a float, `to_i64`/`from_i64`
//! between integers, `!= 0` into bool), without its intermediate f64/i64 vectors. The f32
//! destinations that write into arena regions stay in `executor/routines.rs`; a u64 source
//! to an integer (which the interpreter treats apart) returns `None`.

use kiln_ir::{dispatch, DType, Elem, Node, Tensor};

/// The output of a `cast` node, or `None` where the interpreter runs it.
pub fn run(node: &Node, ins: &[Option<&Tensor>]) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let to = match node.attrs.get("to")? {
        kiln_ir::Attr::Int(code) => DType::from_onnx_code(*code as i32)?,
        kiln_ir::Attr::Str(s) => s.parse().ok()?,
        _ => return None,
    };
    let from = x.dtype();
    if from == to {
        return Some(x.clone());
    }
    let float = from.is_float() || to.is_float();
    if !float && from == DType::U64 {
        return None;
    }
    fn into<T: Elem + Copy, U: Elem>(v: &[T], float: bool) -> Vec<U> {
        if float {
            v.iter().map(|&a| U::from_f64(a.to_f64())).collect()
        } else {
            v.iter().map(|&a| U::from_i64(a.to_i64())).collect()
        }
    }
    let shape = x.shape().to_vec();
    let t = dispatch!(x.data(), v, T => {
        let v: &[T] = v;
        match to {
            DType::Bool if !float => Tensor::from_vec(shape, v.iter().map(|&a| a.to_i64() != 0).collect::<Vec<bool>>()),
            DType::F32 => Tensor::from_vec(shape, into::<T, f32>(v, float)),
            DType::F64 => Tensor::from_vec(shape, into::<T, f64>(v, float)),
            DType::I64 => Tensor::from_vec(shape, into::<T, i64>(v, float)),
            DType::I32 => Tensor::from_vec(shape, into::<T, i32>(v, float)),
            DType::I8 => Tensor::from_vec(shape, into::<T, i8>(v, float)),
            DType::U8 => Tensor::from_vec(shape, into::<T, u8>(v, float)),
            DType::Bool => Tensor::from_vec(shape, into::<T, bool>(v, float)),
            _ => return None,
        }
    });
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};

    #[test]
    fn casts_match_the_interpreter_bit_for_bit() {
        let f = Tensor::from_vec(
            vec![10],
            vec![
                0.0f32,
                -0.0,
                1.5,
                -2.7,
                300.9,
                -129.5,
                1e20,
                f32::NAN,
                f32::INFINITY,
                0.49,
            ],
        );
        let i = Tensor::from_vec(vec![6], vec![0i64, 1, -1, 255, 256, i64::MAX]);
        let i32s = Tensor::from_vec(vec![4], vec![0i32, -7, 70000, i32::MIN]);
        let b = Tensor::from_vec(vec![3], vec![true, false, true]);
        let u = Tensor::from_vec(vec![3], vec![0u8, 7, 255]);
        let dts = [
            DType::F32,
            DType::F64,
            DType::I64,
            DType::I32,
            DType::I8,
            DType::U8,
            DType::Bool,
        ];
        let mut native = 0;
        for x in [&f, &i, &i32s, &b, &u] {
            for to in dts {
                let attrs = Attrs::new().with("to", Attr::Str(to.to_string()));
                let nd = Node {
                    op: kiln_ir::OpKind::Cast,
                    attrs,
                    inputs: vec![Some(ValueId(0))],
                    outputs: vec![ValueId(1)],
                    name: String::new(),
                };
                let want = kiln_ir::ops::eval(nd.op, &nd.attrs, &[Some(x)]).expect("reference");
                let got = run(&nd, &[Some(x)]).expect("native");
                assert_eq!(got, want[0], "{} -> {to}", x.dtype());
                native += 1;
            }
        }
        assert_eq!(native, 35);
    }
}
