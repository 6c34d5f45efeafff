//! The quantization op family: ONNX `QuantizeLinear` and `DequantizeLinear` over the
//! integer types kiln has (i8, u8, i16, u16, i32), and `DynamicQuantizeLinear`. Shape rules
//! and reference semantics side by side. (The integer contractions are in `quant_linalg.rs`.)
//!
//! - `quantize_linear(x, scale, zero_point?) = clamp(round_half_even(x / scale) + zp)` into
//!   the zero point's dtype, else `output_dtype`, else u8.
//! - `dequantize_linear(x, scale, zero_point?) = (x - zp) · scale` in `output_dtype`, else
//!   the scale's dtype.
//!
//! - `dynamic_quantize_linear(x) = (y, scale, zp)`: u8 quantization of f32 `x` over
//!   `[min(0, min x), max(0, max x)]`, `scale = (hi - lo) / 255` (1/255 when `hi = lo`),
//!   `zp = round_half_even(clamp(-lo / scale, 0, 255))`, `y = clamp(round_half_even(x /
//!   scale) + zp, 0, 255)`, all in f32 as ONNX computes it. A NaN or infinite `x` has no
//!   quantization: an error.
//!
//! The scale and zero point are per tensor (one element), per axis (1-D, one per index of
//! `axis`), or blocked (`block_size > 0`: x's shape with `axis` divided by the block size,
//! rounded up). The one index map here serves both ops.

use super::movement::checked_numel;
use super::shared::{fact, from_f64s};
use super::{arg, norm_axis, not_in_family, opt_arg, Fact};
use crate::{Attrs, DType, OpKind, Shape, Tensor};

/// Shape rule of the quantization ops: x's shape in the output dtype.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let x = arg(inputs, 0)?;
    if op == OpKind::DynamicQuantizeLinear {
        if x.ty.dtype != DType::F32 {
            return Err(format!(
                "DynamicQuantizeLinear needs f32 x, got {}",
                x.ty.dtype
            ));
        }
        return Ok(vec![
            fact(DType::U8, x.ty.shape.clone()),
            fact(DType::F32, Shape::new(vec![])),
            fact(DType::U8, Shape::new(vec![])),
        ]);
    }
    let scale = arg(inputs, 1)?;
    let zp = opt_arg(inputs, 2).map(|f| f.ty.dtype);
    let dt = match op {
        OpKind::QuantizeLinear => quant_dtype(attrs, zp)?,
        OpKind::DequantizeLinear => dequant_dtype(attrs, scale.ty.dtype)?,
        _ => return Err(not_in_family(op)),
    };
    Ok(vec![fact(dt, x.ty.shape.clone())])
}

/// Reference semantics of the quantization ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    if op == OpKind::DynamicQuantizeLinear {
        return dynamic_quantize(arg(inputs, 0)?);
    }
    let (x, scale) = (arg(inputs, 0)?, arg(inputs, 1)?);
    let zp = opt_arg(inputs, 2);
    if !scale.dtype().is_float() {
        return Err(format!("the scale must be float, got {}", scale.dtype()));
    }
    let xs = x.shape();
    checked_numel(xs)?;
    let map = param_index(attrs, xs, scale.shape())?;
    let sv = scale.to_f64s();
    let zv = match zp {
        Some(z) => {
            if z.len() != scale.len() || (z.len() != 1 && z.shape() != scale.shape()) {
                return Err(format!(
                    "zero point {:?} and scale {:?} differ in shape",
                    z.shape(),
                    scale.shape()
                ));
            }
            z.to_f64s()
        }
        None => vec![0.0; sv.len()],
    };
    let out = match op {
        OpKind::QuantizeLinear => {
            let dt = quant_dtype(attrs, zp.map(Tensor::dtype))?;
            if !x.dtype().is_float() {
                return Err(format!("QuantizeLinear needs float x, got {}", x.dtype()));
            }
            let (lo, hi) = int_range(dt)?;
            let f32_math = x.dtype() == DType::F32 && scale.dtype() == DType::F32;
            let y = x
                .to_f64s()
                .into_iter()
                .zip(&map)
                .map(|(v, &k)| {
                    // Divide in f32 when the operands are f32, as ONNX does, so ties round alike.
                    let q = if f32_math {
                        f64::from(v as f32 / sv[k] as f32)
                    } else {
                        v / sv[k]
                    };
                    (q.round_ties_even() + zv[k]).clamp(lo, hi)
                })
                .collect();
            from_f64s(dt, xs.to_vec(), y)?
        }
        OpKind::DequantizeLinear => {
            let dt = dequant_dtype(attrs, scale.dtype())?;
            if let Some(z) = zp {
                if z.dtype() != x.dtype() {
                    return Err(format!("zero point is {}, x is {}", z.dtype(), x.dtype()));
                }
            }
            int_range(x.dtype())?;
            let y = x
                .to_f64s()
                .into_iter()
                .zip(&map)
                .map(|(v, &k)| (v - zv[k]) * sv[k])
                .collect();
            from_f64s(dt, xs.to_vec(), y)?
        }
        _ => return Err(not_in_family(op)),
    };
    Ok(vec![out])
}

/// DynamicQuantizeLinear: u8 values, their scale and zero point (see the module doc).
fn dynamic_quantize(x: &Tensor) -> Result<Vec<Tensor>, String> {
    let xv = x
        .as_slice::<f32>()
        .ok_or_else(|| format!("DynamicQuantizeLinear needs f32 x, got {}", x.dtype()))?;
    let (scale, zp) = dynamic_params(xv)?;
    let y: Vec<u8> = xv
        .iter()
        .map(|&v| ((v / scale).round_ties_even() + zp).clamp(0.0, 255.0) as u8)
        .collect();
    Ok(vec![
        Tensor::from_vec(x.shape().to_vec(), y),
        Tensor::scalar(scale),
        Tensor::scalar(zp as u8),
    ])
}

/// DynamicQuantizeLinear's scale and (integral) zero point for the values `xv`, computed in
/// f32 step by step as the ONNX reference does. Shared with the runtime's fast path.
pub fn dynamic_params(xv: &[f32]) -> Result<(f32, f32), String> {
    let (mut lo, mut hi) = (0.0f32, 0.0f32);
    for &v in xv {
        if !v.is_finite() {
            return Err(format!(
                "DynamicQuantizeLinear input holds {v}, which has no u8 quantization"
            ));
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    // ONNX's reference takes a range of 1 for an all-zero input (its scale is then 1/255).
    let range = if hi == lo { 1.0f32 } else { hi - lo };
    let scale = range / 255.0f32;
    let zp = (0.0f32 - lo / scale).clamp(0.0, 255.0).round_ties_even();
    Ok((scale, zp))
}

/// QuantizeLinear's output dtype: the zero point's, else `output_dtype`, else u8.
fn quant_dtype(attrs: &Attrs, zp: Option<DType>) -> Result<DType, String> {
    let attr = attrs
        .string("output_dtype")?
        .map(|s| s.parse::<DType>())
        .transpose()?;
    let dt = match (zp, attr) {
        (Some(z), Some(a)) if z != a => {
            return Err(format!("zero point is {z} but output_dtype is {a}"))
        }
        (Some(z), _) => z,
        (None, Some(a)) => a,
        (None, None) => DType::U8,
    };
    int_range(dt)?;
    Ok(dt)
}

/// DequantizeLinear's output dtype: `output_dtype`, else the scale's.
fn dequant_dtype(attrs: &Attrs, scale: DType) -> Result<DType, String> {
    let dt = match attrs.string("output_dtype")? {
        Some(s) => s.parse::<DType>()?,
        None => scale,
    };
    if !dt.is_float() {
        return Err(format!("DequantizeLinear output must be float, got {dt}"));
    }
    Ok(dt)
}

/// The value range of a quantized dtype.
fn int_range(dt: DType) -> Result<(f64, f64), String> {
    Ok(match dt {
        DType::I8 => (-128.0, 127.0),
        DType::U8 => (0.0, 255.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::U16 => (0.0, 65535.0),
        DType::I32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
        other => return Err(format!("{other} is not a quantized type kiln supports")),
    })
}

/// For each element of x (row-major), the index of its scale and zero point.
fn param_index(attrs: &Attrs, xs: &[usize], ps: &[usize]) -> Result<Vec<usize>, String> {
    let n: usize = xs.iter().product();
    let pn: usize = ps.iter().product();
    let block = attrs.int_or("block_size", 0)?;
    if pn == 1 {
        return Ok(vec![0; n]);
    }
    let axis = norm_axis(attrs.int_or("axis", 1)?, xs.len())?;
    let (outer, len, inner) = super::shared::split_axis(xs, axis);
    let mut map = Vec::with_capacity(n);
    if block == 0 {
        if ps != [len] {
            return Err(format!(
                "per-axis scale {ps:?} does not fit axis {axis} of {xs:?}"
            ));
        }
        for _ in 0..outer {
            for a in 0..len {
                map.extend(std::iter::repeat_n(a, inner));
            }
        }
        return Ok(map);
    }
    let block = usize::try_from(block)
        .ok()
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("block_size must be positive, got {block}"))?;
    let blocks = len.div_ceil(block);
    let mut want = xs.to_vec();
    want[axis] = blocks;
    if ps != want.as_slice() {
        return Err(format!(
            "blocked scale {ps:?} does not fit x {xs:?} (expected {want:?})"
        ));
    }
    for o in 0..outer {
        for a in 0..len {
            for i in 0..inner {
                map.push((o * blocks + a / block) * inner + i);
            }
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use crate::{ops, Attr, Attrs, OpKind, Tensor};

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        let x = Tensor::from_vec(vec![4], vec![1.0f32, 3.0, -1000.0, 600.0]);
        let s = Tensor::scalar(2.0f32);
        let z = Tensor::scalar(10u8);
        let y = ops::eval(
            OpKind::QuantizeLinear,
            &Attrs::new(),
            &[Some(&x), Some(&s), Some(&z)],
        )
        .unwrap()
        .remove(0);
        // 0.5 -> 0, 1.5 -> 2 (ties to even), then + 10, clamped to [0, 255].
        assert_eq!(y.as_slice::<u8>().unwrap(), &[10, 12, 0, 255]);
    }

    #[test]
    fn dequantize_per_axis_and_blocked() {
        let x = Tensor::from_vec(vec![2, 3], vec![1i8, 2, 3, 4, 5, 6]);
        let s = Tensor::from_vec(vec![2], vec![1.0f32, 10.0]);
        let z = Tensor::from_vec(vec![2], vec![1i8, 0]);
        let a0 = Attrs::new().with("axis", Attr::Int(0));
        let y = ops::eval(
            OpKind::DequantizeLinear,
            &a0,
            &[Some(&x), Some(&s), Some(&z)],
        )
        .unwrap()
        .remove(0);
        assert_eq!(y.to_f64s(), vec![0.0, 1.0, 2.0, 40.0, 50.0, 60.0]);
        // Blocks of 2 along axis 1: scales [2, 2] -> columns {0, 1} and {2}.
        let sb = Tensor::from_vec(vec![2, 2], vec![1.0f32, 2.0, 3.0, 4.0]);
        let ab = Attrs::new().with("block_size", Attr::Int(2));
        let y = ops::eval(OpKind::DequantizeLinear, &ab, &[Some(&x), Some(&sb)])
            .unwrap()
            .remove(0);
        assert_eq!(y.to_f64s(), vec![1.0, 2.0, 6.0, 12.0, 15.0, 24.0]);
        let bad = Tensor::from_vec(vec![3], vec![1.0f32; 3]);
        assert!(ops::eval(OpKind::DequantizeLinear, &a0, &[Some(&x), Some(&bad)]).is_err());
    }

    #[test]
    fn dynamic_quantize_covers_zero_and_rounds_in_f32() {
        let x = Tensor::from_vec(vec![2, 3], vec![0.0f32, 2.0, -3.0, 1000.0, -2.5, 0.1]);
        let mut out = ops::eval(OpKind::DynamicQuantizeLinear, &Attrs::new(), &[Some(&x)]).unwrap();
        let (y, s, z) = (out.remove(0), out.remove(0), out.remove(0));
        let scale = 1003.0f32 / 255.0;
        assert_eq!(s.as_slice::<f32>().unwrap(), &[scale]);
        let zp = (3.0f32 / scale).round_ties_even();
        assert_eq!(z.as_slice::<u8>().unwrap(), &[zp as u8]);
        let want: Vec<u8> = x
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|&v| ((v / scale).round_ties_even() + zp).clamp(0.0, 255.0) as u8)
            .collect();
        assert_eq!(y.as_slice::<u8>().unwrap(), &want[..]);
        // The range always holds 0, so 0 quantizes exactly to the zero point.
        assert_eq!(y.as_slice::<u8>().unwrap()[0], zp as u8);
        // All positive: zero point 0, the maximum maps to 255.
        let x = Tensor::from_vec(vec![3], vec![1.0f32, 5.0, 255.0]);
        let out = ops::eval(OpKind::DynamicQuantizeLinear, &Attrs::new(), &[Some(&x)]).unwrap();
        assert_eq!(out[0].as_slice::<u8>().unwrap(), &[1, 5, 255]);
        assert_eq!(out[2].as_slice::<u8>().unwrap(), &[0]);
        // All zero: ONNX's scale 1/255.
        let x = Tensor::from_vec(vec![2], vec![0.0f32; 2]);
        let out = ops::eval(OpKind::DynamicQuantizeLinear, &Attrs::new(), &[Some(&x)]).unwrap();
        assert_eq!(out[1].as_slice::<f32>().unwrap(), &[1.0f32 / 255.0]);
        // NaN has no quantization.
        let x = Tensor::from_vec(vec![2], vec![1.0f32, f32::NAN]);
        let e = ops::eval(OpKind::DynamicQuantizeLinear, &Attrs::new(), &[Some(&x)]).unwrap_err();
        assert!(e.contains("NaN"), "{e}");
    }
}
