//! The quant family's per-tensor `quantize_linear` (f32 to u8/i8) and `dequantize_linear`
//! (u8/i8/i32 to f32) natively. Each reproduces the interpreter's arithmetic exactly: the
//! quotient `x / scale` in f32 rounded half to even, the zero point added and clamped
//! (exact integers, so f32 and the interpreter's f64 agree); `(q − zp)·scale` exact in
//! f64 and rounded once. Per-axis or blocked parameters, other dtypes and `output_dtype`
//! attributes return `None`: the interpreter runs those and reports errors.

use kiln_ir::{DType, Node, OpKind, Tensor};

/// The output of a per-tensor quantize/dequantize node, or `None`.
pub fn run(node: &Node, ins: &[Option<&Tensor>]) -> Option<Tensor> {
    if node.attrs.get("output_dtype").is_some() {
        return None;
    }
    let x = (*ins.first()?)?;
    let st = (*ins.get(1)?)?;
    if st.len() != 1 {
        return None;
    }
    let scale = st.as_slice::<f32>()?[0];
    let zp = ins.get(2).copied().flatten();
    if zp.is_some_and(|z| z.len() != 1) {
        return None;
    }
    let shape = x.shape().to_vec();
    match node.op {
        OpKind::QuantizeLinear => {
            let v = x.as_slice::<f32>()?;
            let q = |lo: f32, hi: f32, z: f32| {
                v.iter()
                    .map(move |&a| ((a / scale).round_ties_even() + z).clamp(lo, hi))
            };
            match zp.map(Tensor::dtype) {
                None | Some(DType::U8) => {
                    let z =
                        zp.map_or(Some(0.0), |z| z.as_slice::<u8>().map(|z| f32::from(z[0])))?;
                    Some(Tensor::from_vec(
                        shape,
                        q(0.0, 255.0, z).map(|f| f as u8).collect::<Vec<u8>>(),
                    ))
                }
                Some(DType::I8) => {
                    let z = f32::from(zp?.as_slice::<i8>()?[0]);
                    Some(Tensor::from_vec(
                        shape,
                        q(-128.0, 127.0, z).map(|f| f as i8).collect::<Vec<i8>>(),
                    ))
                }
                _ => None,
            }
        }
        OpKind::DequantizeLinear => {
            if zp.is_some_and(|z| z.dtype() != x.dtype()) {
                return None;
            }
            let s = f64::from(scale);
            let y: Vec<f32> = match x.dtype() {
                DType::U8 => {
                    let z =
                        zp.map_or(Some(0.0), |z| z.as_slice::<u8>().map(|z| f64::from(z[0])))?;
                    x.as_slice::<u8>()?
                        .iter()
                        .map(|&q| ((f64::from(q) - z) * s) as f32)
                        .collect()
                }
                DType::I8 => {
                    let z =
                        zp.map_or(Some(0.0), |z| z.as_slice::<i8>().map(|z| f64::from(z[0])))?;
                    x.as_slice::<i8>()?
                        .iter()
                        .map(|&q| ((f64::from(q) - z) * s) as f32)
                        .collect()
                }
                DType::I32 => {
                    let z =
                        zp.map_or(Some(0.0), |z| z.as_slice::<i32>().map(|z| f64::from(z[0])))?;
                    x.as_slice::<i32>()?
                        .iter()
                        .map(|&q| ((f64::from(q) - z) * s) as f32)
                        .collect()
                }
                _ => return None,
            };
            Some(Tensor::from_vec(shape, y))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attrs, ValueId};

    fn node(op: OpKind, n_in: u32) -> Node {
        Node {
            op,
            attrs: Attrs::new(),
            inputs: (0..n_in).map(|i| Some(ValueId(i))).collect(),
            outputs: vec![ValueId(n_in)],
            name: String::new(),
        }
    }

    #[test]
    fn per_tensor_quantize_and_dequantize_match_the_interpreter_bit_for_bit() {
        let xs: Vec<f32> = (0..400)
            .map(|i| (i as f32 - 200.0) * 0.173)
            .chain([0.5, 1.5, -0.5, -2.5, 1e9, -1e9, f32::NAN, f32::INFINITY])
            .collect();
        let x = Tensor::from_vec(vec![xs.len()], xs);
        let scale = Tensor::scalar(0.25f32);
        let zps = [
            None,
            Some(Tensor::scalar(7u8)),
            Some(Tensor::scalar(-3i8)),
            Some(Tensor::from_vec(vec![1], vec![128u8])),
        ];
        for zp in &zps {
            let ins = [Some(&x), Some(&scale), zp.as_ref()];
            let n = node(OpKind::QuantizeLinear, 3);
            let want = kiln_ir::ops::eval(n.op, &n.attrs, &ins).expect("reference");
            let q = run(&n, &ins).expect("native");
            assert_eq!(q, want[0], "quantize, zero point {zp:?}");
            let dins = [Some(&q), Some(&scale), zp.as_ref()];
            let d = node(OpKind::DequantizeLinear, 3);
            let want = kiln_ir::ops::eval(d.op, &d.attrs, &dins).expect("reference");
            assert_eq!(
                run(&d, &dins).expect("native"),
                want[0],
                "dequantize {zp:?}"
            );
        }
        let acc = Tensor::from_vec(vec![4], vec![i32::MIN, -5, 0, i32::MAX]);
        let d = node(OpKind::DequantizeLinear, 2);
        let ins = [Some(&acc), Some(&scale)];
        let want = kiln_ir::ops::eval(d.op, &d.attrs, &ins).expect("reference");
        assert_eq!(run(&d, &ins).expect("native"), want[0]);
        // Per-axis scales go to the interpreter.
        let axis = Tensor::from_vec(vec![2], vec![0.5f32, 0.25]);
        let x2 = Tensor::from_vec(vec![2, 2], vec![1f32, 2.0, 3.0, 4.0]);
        assert!(run(&node(OpKind::QuantizeLinear, 2), &[Some(&x2), Some(&axis)]).is_none());
    }
}
