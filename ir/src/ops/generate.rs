//! The generate op family (constant, constant_of_shape, range, eye_like): tensors made
//! from attributes or shapes. Shape rules and reference semantics side by side.
//!
//! Sizes here come from data (a shape tensor, a range's bounds), so they are checked
//! against [`MAX_ELEMS`](super::movement::MAX_ELEMS) and the memory limit
//! ([`crate::limits`]) before anything is allocated.

use super::movement::{checked_numel, dims_or_len, fact, ints, take, to_size, MAX_ELEMS};
use super::{arg, not_in_family, Fact};
use crate::{Attrs, DType, Dim, OpKind, Shape, Tensor, TensorData, TensorType};
use std::sync::Arc;

/// Shape rule of the generate ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    match op {
        // constant {value}: the tensor itself.
        OpKind::Constant => {
            let t = attrs.req_tensor("value")?;
            let ty = TensorType::new(t.dtype(), Shape::fixed(t.shape()));
            Ok(vec![Fact {
                ty,
                konst: Some(t),
                dims: None,
            }])
        }
        // constant_of_shape(shape) {value}: the shape tensor's contents are the shape.
        OpKind::ConstantOfShape => {
            let s = arg(inputs, 0)?;
            let dt = fill_value(attrs)?.dtype();
            let shape = dims_or_len(s).map(Shape::new).unwrap_or(Shape::unknown());
            Ok(vec![fact(dt, shape)])
        }
        // range(start, limit, delta): [ceil((limit - start) / delta)].
        OpKind::Range => {
            let start = arg(inputs, 0)?;
            let limit = arg(inputs, 1)?;
            let delta = arg(inputs, 2)?;
            let dt = start.ty.dtype;
            if limit.ty.dtype != dt || delta.ty.dtype != dt {
                return Err(format!(
                    "start, limit and delta must share a dtype: {dt}, {}, {}",
                    limit.ty.dtype, delta.ty.dtype
                ));
            }
            let n = match (start.value_dims(), limit.value_dims(), delta.value_dims()) {
                // range(0, n, 1) has n elements, whatever n is.
                (Some(s), Some(l), Some(d))
                    if s == [Dim::Fixed(0)] && d == [Dim::Fixed(1)] && l.len() == 1 =>
                {
                    l[0].clone()
                }
                _ => Dim::Unknown,
            };
            Ok(vec![fact(dt, Shape::new(vec![n]))])
        }
        // eye_like(x) {dtype, k}: x's shape, rank 2.
        OpKind::EyeLike => {
            let x = arg(inputs, 0)?;
            let dt = eye_dtype(attrs, x.ty.dtype)?;
            if let Some(r) = x.ty.shape.rank() {
                if r != 2 {
                    return Err(format!("eye_like needs rank 2, got {r}"));
                }
            }
            let shape = match x.ty.shape.dims() {
                Some(d) => Shape::new(d.to_vec()),
                None => Shape::unknown_of_rank(2),
            };
            Ok(vec![fact(dt, shape)])
        }
        _ => Err(not_in_family(op)),
    }
}

/// Reference semantics of the generate ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    match op {
        OpKind::Constant => Ok(vec![attrs.req_tensor("value")?.as_ref().clone()]),
        OpKind::ConstantOfShape => {
            let s = arg(inputs, 0)?;
            if s.rank() > 1 {
                return Err(format!("the shape must be 1-D, got rank {}", s.rank()));
            }
            let mut shape = Vec::with_capacity(s.len());
            for d in ints(s, "shape")? {
                shape.push(to_size(d, "shape entries")?);
            }
            let n = checked_numel(&shape)?;
            let v = fill_value(attrs)?;
            Ok(vec![Tensor::new(shape, take(v.data(), &vec![0; n])?)?])
        }
        OpKind::Range => {
            let start = arg(inputs, 0)?;
            let limit = arg(inputs, 1)?;
            let delta = arg(inputs, 2)?;
            let dt = start.dtype();
            if limit.dtype() != dt || delta.dtype() != dt {
                return Err("start, limit and delta must share a dtype".into());
            }
            for (t, name) in [(start, "start"), (limit, "limit"), (delta, "delta")] {
                if t.len() != 1 {
                    return Err(format!("{name} must be a scalar, has {} elements", t.len()));
                }
            }
            let data = if dt.is_int() {
                range_int(dt, start, limit, delta)?
            } else if dt.is_float() {
                let (s, l, d) = (start.to_f64s()[0], limit.to_f64s()[0], delta.to_f64s()[0]);
                if d == 0.0 || !d.is_finite() || !s.is_finite() || !l.is_finite() {
                    return Err(format!("range({s}, {l}, {d}) is not finite"));
                }
                let n = ((l - s) / d).ceil().max(0.0);
                if n > MAX_ELEMS as f64 {
                    return Err(format!(
                        "range({s}, {l}, {d}) has {n} elements, more than the limit of {MAX_ELEMS}"
                    ));
                }
                let n = n as usize;
                crate::limits::check(n, dt.size(), &[n])?;
                TensorData::from_f64s(dt, (0..n).map(|i| s + i as f64 * d))
            } else {
                return Err(format!("range does not take {dt}"));
            };
            let n = data.len();
            Ok(vec![Tensor::new(vec![n], data)?])
        }
        OpKind::EyeLike => {
            let x = arg(inputs, 0)?;
            let dt = eye_dtype(attrs, x.dtype())?;
            let [r, c] = *x.shape() else {
                return Err(format!("eye_like needs rank 2, got {}", x.rank()));
            };
            let k = attrs.int_or("k", 0)?;
            let vals = (0..r * c).map(|f| {
                let (i, j) = ((f / c) as i64, (f % c) as i64);
                if j - i == k {
                    1.0
                } else {
                    0.0
                }
            });
            Ok(vec![Tensor::new(
                vec![r, c],
                TensorData::from_f64s(dt, vals),
            )?])
        }
        _ => Err(not_in_family(op)),
    }
}

/// The fill of constant_of_shape: its `value` attribute (one element), or f32 zero.
fn fill_value(attrs: &Attrs) -> Result<Arc<Tensor>, String> {
    match attrs.tensor("value")? {
        Some(t) if t.len() == 1 => Ok(t),
        Some(t) => Err(format!("value must have one element, has {}", t.len())),
        None => Ok(Arc::new(Tensor::scalar(0f32))),
    }
}

/// The output dtype of eye_like: its `dtype` attribute, or the input's.
fn eye_dtype(attrs: &Attrs, input: DType) -> Result<DType, String> {
    match attrs.string("dtype")? {
        Some(s) => s.parse(),
        None => Ok(input),
    }
}

/// An integer range, computed exactly in i128.
fn range_int(
    dt: DType,
    start: &Tensor,
    limit: &Tensor,
    delta: &Tensor,
) -> Result<TensorData, String> {
    let one = |t: &Tensor| -> Result<i128, String> {
        Ok(if dt == DType::U64 {
            t.as_slice::<u64>()
                .and_then(|v| v.first())
                .copied()
                .unwrap_or(0) as i128
        } else {
            ints(t, "range bound")?[0] as i128
        })
    };
    let (s, l, d) = (one(start)?, one(limit)?, one(delta)?);
    if d == 0 {
        return Err("range delta must not be 0".into());
    }
    let span = l - s;
    let n = if (span > 0) == (d > 0) && span != 0 {
        (span + d - d.signum()) / d
    } else {
        0
    };
    if n > MAX_ELEMS as i128 {
        return Err(format!(
            "range({s}, {l}, {d}) has {n} elements, more than the limit of {MAX_ELEMS}"
        ));
    }
    crate::limits::check(n as usize, dt.size(), &[n as usize])?;
    Ok(TensorData::from_i64s(
        dt,
        (0..n).map(|i| (s + i * d) as i64),
    ))
}
