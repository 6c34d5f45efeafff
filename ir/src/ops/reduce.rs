//! The reduce op family: reductions along axes (axes are an input, `keepdims`,
//! `noop_with_empty_axes`), arg-reductions and cumulative sums and products. Shape rules and reference
//! semantics side by side; every reduction streams the input once through one loop that
//! maps each element to its output slot.
// `dispatch!` instantiates the generic comparisons at `bool` too, where clippy would
// rewrite `a < b` as bit logic; the generic form is the point.
#![allow(clippy::bool_comparison)]

use super::shared::{bcast_offsets, fact, split_axis, Num};
use super::{arg, norm_axis, not_in_family, opt_arg, Fact};
use crate::{Attrs, DType, Dim, Elem, OpKind, Shape, Tensor, TensorData};

/// Shape rule of the reduce ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let x = arg(inputs, 0)?;
    let keep = attrs.int_or("keepdims", 1)? != 0;
    let out = match op {
        OpKind::CumSum | OpKind::CumProd => fact(x.ty.dtype, x.ty.shape.clone()),
        OpKind::ArgMax | OpKind::ArgMin => {
            let shape = match x.ty.shape.dims() {
                None => Shape::unknown(),
                Some(d) => {
                    let ax = norm_axis(attrs.int_or("axis", 0)?, d.len())?;
                    reduced_dims(d, &[ax], keep)
                }
            };
            fact(DType::I64, shape)
        }
        _ => {
            let Some(d) = x.ty.shape.dims() else {
                return Ok(vec![fact(x.ty.dtype, Shape::unknown())]);
            };
            let noop = attrs.int_or("noop_with_empty_axes", 0)? != 0;
            let axes = match opt_arg(inputs, 1) {
                None => Some(vec![]),
                Some(f) => f.konst.as_ref().map(|k| k.to_i64s()),
            };
            let shape = match axes {
                None if keep => Shape::unknown_of_rank(d.len()),
                None => Shape::unknown(),
                Some(a) if a.is_empty() && noop => Shape::new(d.to_vec()),
                Some(a) => {
                    let axes = norm_axes(&a, d.len())?;
                    reduced_dims(d, &axes, keep)
                }
            };
            fact(x.ty.dtype, shape)
        }
    };
    Ok(vec![out])
}

/// Normalised, deduplicated axes; empty means all.
fn norm_axes(a: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    if a.is_empty() {
        return Ok((0..rank).collect());
    }
    let mut v = a
        .iter()
        .map(|&x| norm_axis(x, rank))
        .collect::<Result<Vec<_>, _>>()?;
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

fn reduced_dims(d: &[Dim], axes: &[usize], keep: bool) -> Shape {
    let mut out = Vec::new();
    for (i, dim) in d.iter().enumerate() {
        if axes.contains(&i) {
            if keep {
                out.push(Dim::Fixed(1));
            }
        } else {
            out.push(dim.clone());
        }
    }
    Shape::new(out)
}

/// Reference semantics of the reduce ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let x = arg(inputs, 0)?;
    let keep = attrs.int_or("keepdims", 1)? != 0;
    let out = match op {
        OpKind::CumSum | OpKind::CumProd => {
            let axis = arg(inputs, 1)?;
            let a = *axis.to_i64s().first().ok_or("cumulative axis is empty")?;
            let axis = norm_axis(a, x.rank())?;
            let excl = attrs.int_or("exclusive", 0)? != 0;
            let rev = attrs.int_or("reverse", 0)? != 0;
            cumulative(x, axis, excl, rev, op == OpKind::CumProd)?
        }
        OpKind::ArgMax | OpKind::ArgMin => {
            let axis = norm_axis(attrs.int_or("axis", 0)?, x.rank())?;
            let last = attrs.int_or("select_last_index", 0)? != 0;
            arg_reduce(x, axis, keep, op == OpKind::ArgMax, last)?
        }
        _ => {
            let noop = attrs.int_or("noop_with_empty_axes", 0)? != 0;
            let a = opt_arg(inputs, 1).map(|t| t.to_i64s()).unwrap_or_default();
            if a.is_empty() && noop {
                return Ok(vec![x.clone()]);
            }
            let axes = norm_axes(&a, x.rank())?;
            reduce(op, x, &axes, keep)?
        }
    };
    Ok(vec![out])
}

fn reduce(op: OpKind, x: &Tensor, axes: &[usize], keep: bool) -> Result<Tensor, String> {
    use OpKind::*;
    let shape = x.shape();
    let kept: Vec<usize> = (0..shape.len())
        .map(|i| if axes.contains(&i) { 1 } else { shape[i] })
        .collect();
    let out_shape: Vec<usize> = if keep {
        kept.clone()
    } else {
        (0..shape.len())
            .filter(|i| !axes.contains(i))
            .map(|i| shape[i])
            .collect()
    };
    let m: usize = kept.iter().product();
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    // Offset of each input element's output slot.
    let slot = bcast_offsets(shape, &kept);
    let native = !x.dtype().is_float()
        && matches!(
            op,
            ReduceSum | ReduceProd | ReduceSumSquare | ReduceL1 | ReduceMax | ReduceMin
        );
    if native {
        if x.dtype() == DType::Bool && !matches!(op, ReduceMax | ReduceMin) {
            return Err(format!("`{}` does not take bool", op.name()));
        }
        let data = crate::dispatch!(x.data(), v, T => {
            let init = match op {
                ReduceProd => T::one(),
                ReduceMax => T::lowest(),
                ReduceMin => T::highest(),
                _ => T::zero(),
            };
            let mut acc = vec![init; m];
            for (&e, &s) in v.iter().zip(&slot) {
                let a = &mut acc[s];
                *a = match op {
                    ReduceSum => a.add(e),
                    ReduceProd => a.mul(e),
                    ReduceSumSquare => a.add(e.mul(e)),
                    ReduceL1 => a.add(e.abs_()),
                    ReduceMax => a.max_(e),
                    _ => a.min_(e),
                };
            }
            <T as Elem>::wrap(acc)
        });
        return Tensor::new(out_shape, data);
    }
    if x.dtype() == DType::Bool {
        return Err(format!("`{}` does not take bool", op.name()));
    }
    let v = x.to_f64s();
    let init = match op {
        ReduceProd => 1.0,
        ReduceMax => f64::NEG_INFINITY,
        ReduceMin => f64::INFINITY,
        _ => 0.0,
    };
    let mut acc = vec![init; m];
    // log-sum-exp subtracts each slot's max first, for stability.
    let mut shift = vec![0.0f64; m];
    if op == ReduceLogSumExp {
        shift = vec![f64::NEG_INFINITY; m];
        for (&e, &s) in v.iter().zip(&slot) {
            if e > shift[s] || e.is_nan() {
                shift[s] = e;
            }
        }
        for s in &mut shift {
            if s.is_infinite() {
                *s = 0.0;
            }
        }
    }
    for (&e, &s) in v.iter().zip(&slot) {
        let a = &mut acc[s];
        match op {
            ReduceSum | ReduceMean | ReduceLogSum => *a += e,
            ReduceProd => *a *= e,
            ReduceSumSquare | ReduceL2 => *a += e * e,
            ReduceL1 => *a += e.abs(),
            ReduceLogSumExp => *a += (e - shift[s]).exp(),
            ReduceMax => {
                if e > *a || e.is_nan() {
                    *a = e
                }
            }
            ReduceMin => {
                if e < *a || e.is_nan() {
                    *a = e
                }
            }
            _ => return Err(not_in_family(op)),
        }
    }
    for (a, s) in acc.iter_mut().zip(&shift) {
        *a = match op {
            ReduceMean => *a / count as f64,
            ReduceL2 => a.sqrt(),
            ReduceLogSum => a.ln(),
            ReduceLogSumExp => a.ln() + s,
            _ => *a,
        };
    }
    Tensor::new(out_shape, TensorData::from_f64s(x.dtype(), acc.into_iter()))
}

fn arg_reduce(
    x: &Tensor,
    axis: usize,
    keep: bool,
    max: bool,
    last: bool,
) -> Result<Tensor, String> {
    if x.rank() == 0 {
        return Err("arg reduction needs rank >= 1".into());
    }
    let (outer, len, inner) = split_axis(x.shape(), axis);
    if len == 0 {
        return Err("arg reduction over an empty axis".into());
    }
    let mut out_shape = x.shape().to_vec();
    if keep {
        out_shape[axis] = 1;
    } else {
        out_shape.remove(axis);
    }
    let mut out = Vec::with_capacity(outer * inner);
    crate::dispatch!(x.data(), v, T => {
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| v[(o * len + j) * inner + i];
                let mut best = 0usize;
                for j in 1..len {
                    let (c, b) = (at(j), at(best));
                    let better = if max { c > b || (last && c == b) } else { c < b || (last && c == b) };
                    if better {
                        best = j;
                    }
                }
                out.push(best as i64);
            }
        }
    });
    Tensor::new(out_shape, TensorData::I64(out.into()))
}

/// Running sum (or product, with `prod`) along `axis`; `excl` starts from the identity
/// and leaves the current element out, `rev` runs from the end.
fn cumulative(
    x: &Tensor,
    axis: usize,
    excl: bool,
    rev: bool,
    prod: bool,
) -> Result<Tensor, String> {
    if x.dtype() == DType::Bool {
        return Err("cumulative sums and products do not take bool".into());
    }
    let (outer, len, inner) = split_axis(x.shape(), axis);
    let data = crate::dispatch!(x.data(), v, T => {
        let mut out = vec![T::zero(); v.len()];
        for o in 0..outer {
            for i in 0..inner {
                let mut acc = if prod { T::one() } else { T::zero() };
                let step = |a: T, b: T| if prod { a.mul(b) } else { a.add(b) };
                for jj in 0..len {
                    let j = if rev { len - 1 - jj } else { jj };
                    let p = (o * len + j) * inner + i;
                    if excl {
                        out[p] = acc;
                        acc = step(acc, v[p]);
                    } else {
                        acc = step(acc, v[p]);
                        out[p] = acc;
                    }
                }
            }
        }
        <T as Elem>::wrap(out)
    });
    Tensor::new(x.shape().to_vec(), data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attr, TensorType};

    fn run(op: OpKind, attrs: Attrs, ins: &[Option<&Tensor>]) -> Result<Tensor, String> {
        eval(op, &attrs, ins).map(|mut v| v.remove(0))
    }
    fn x() -> Tensor {
        // np.array([[1, -2, 3], [4, 5, -6]], dtype=np.float32)
        Tensor::from_vec(vec![2, 3], vec![1.0f32, -2.0, 3.0, 4.0, 5.0, -6.0])
    }
    fn axes(v: &[i64]) -> Tensor {
        Tensor::from_vec(vec![v.len()], v.to_vec())
    }

    #[test]
    fn reduce_mean_over_last_axis_keeps_dims() {
        let r = run(
            OpKind::ReduceMean,
            Attrs::new(),
            &[Some(&x()), Some(&axes(&[-1]))],
        )
        .unwrap();
        assert_eq!(r.shape(), &[2, 1]);
        assert_eq!(r.as_slice::<f32>().unwrap(), &[2.0 / 3.0, 1.0]);
    }

    #[test]
    fn reduce_ops_match_numpy() {
        let no_keep = || Attrs::new().with("keepdims", Attr::Int(0));
        let cases: &[(OpKind, &[f32])] = &[
            (OpKind::ReduceSum, &[5.0, 3.0, -3.0]),
            (OpKind::ReduceProd, &[4.0, -10.0, -18.0]),
            (OpKind::ReduceMax, &[4.0, 5.0, 3.0]),
            (OpKind::ReduceMin, &[1.0, -2.0, -6.0]),
            (OpKind::ReduceL1, &[5.0, 7.0, 9.0]),
            (OpKind::ReduceSumSquare, &[17.0, 29.0, 45.0]),
            // np.sqrt([17, 29, 45]), np.log(np.exp(x).sum(0))
            (OpKind::ReduceL2, &[4.123_105_6, 5.385_164_8, 6.708_204]),
            (
                OpKind::ReduceLogSumExp,
                &[4.048_587_4, 5.000_911_7, 3.000_123_4],
            ),
        ];
        for (op, want) in cases {
            let r = run(*op, no_keep(), &[Some(&x()), Some(&axes(&[0]))]).unwrap();
            assert_eq!(r.shape(), &[3], "{op:?}");
            for (a, b) in r.as_slice::<f32>().unwrap().iter().zip(*want) {
                assert!((a - b).abs() < 1e-5, "{op:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn empty_axes_reduce_all_unless_noop() {
        let r = run(OpKind::ReduceSum, Attrs::new(), &[Some(&x()), None]).unwrap();
        assert_eq!(r.shape(), &[1, 1]);
        assert_eq!(r.as_slice::<f32>().unwrap(), &[5.0]);
        let noop = Attrs::new().with("noop_with_empty_axes", Attr::Int(1));
        let r = run(OpKind::ReduceSum, noop, &[Some(&x()), Some(&axes(&[]))]).unwrap();
        assert_eq!(r, x());
    }

    #[test]
    fn integer_reductions_wrap_and_empty_sets_give_identities() {
        let t = Tensor::from_vec(vec![2], vec![i8::MAX, 1]);
        let r = run(OpKind::ReduceSum, Attrs::new(), &[Some(&t), None]).unwrap();
        assert_eq!(r.as_slice::<i8>().unwrap(), &[i8::MIN]);
        let e = Tensor::from_vec(vec![2, 0], Vec::<f32>::new());
        let r = run(
            OpKind::ReduceMax,
            Attrs::new(),
            &[Some(&e), Some(&axes(&[1]))],
        )
        .unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[f32::NEG_INFINITY; 2]);
        let r = run(
            OpKind::ReduceProd,
            Attrs::new(),
            &[Some(&e), Some(&axes(&[1]))],
        )
        .unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1.0; 2]);
    }

    #[test]
    fn argmax_select_last_index() {
        let t = Tensor::from_vec(vec![2, 3], vec![1i32, 3, 3, 2, 2, 0]);
        let r = run(
            OpKind::ArgMax,
            Attrs::new().with("axis", Attr::Int(1)),
            &[Some(&t)],
        )
        .unwrap();
        assert_eq!(r.shape(), &[2, 1]);
        assert_eq!(r.to_i64s(), vec![1, 0]);
        let last = Attrs::new()
            .with("axis", Attr::Int(1))
            .with("select_last_index", Attr::Int(1))
            .with("keepdims", Attr::Int(0));
        let r = run(OpKind::ArgMax, last, &[Some(&t)]).unwrap();
        assert_eq!(r.to_i64s(), vec![2, 1]);
        let r = run(OpKind::ArgMin, Attrs::new(), &[Some(&t)]).unwrap();
        assert_eq!(r.to_i64s(), vec![0, 1, 1]);
    }

    #[test]
    fn cumsum_exclusive_and_reverse() {
        let t = Tensor::from_vec(vec![4], vec![1.0f64, 2.0, 3.0, 4.0]);
        let ax = Tensor::scalar(0i64);
        let r = run(OpKind::CumSum, Attrs::new(), &[Some(&t), Some(&ax)]).unwrap();
        assert_eq!(r.as_slice::<f64>().unwrap(), &[1.0, 3.0, 6.0, 10.0]);
        let er = Attrs::new()
            .with("exclusive", Attr::Int(1))
            .with("reverse", Attr::Int(1));
        let r = run(OpKind::CumSum, er, &[Some(&t), Some(&ax)]).unwrap();
        assert_eq!(r.as_slice::<f64>().unwrap(), &[9.0, 7.0, 4.0, 0.0]);
    }

    #[test]
    fn cumprod_inclusive_exclusive_and_reverse() {
        let t = Tensor::from_vec(vec![4], vec![1i32, 2, 3, 4]);
        let ax = Tensor::scalar(-1i64);
        let r = run(OpKind::CumProd, Attrs::new(), &[Some(&t), Some(&ax)]).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[1, 2, 6, 24]);
        let er = Attrs::new()
            .with("exclusive", Attr::Int(1))
            .with("reverse", Attr::Int(1));
        let r = run(OpKind::CumProd, er, &[Some(&t), Some(&ax)]).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[24, 12, 4, 1]);
    }

    #[test]
    fn infer_uses_constant_axes_and_keeps_symbols() {
        let f = Fact::of(TensorType::new(
            DType::F32,
            Shape::new(vec!["B".into(), "S".into(), Dim::Fixed(768)]),
        ));
        let mut a = Fact::of(TensorType::new(DType::I64, Shape::fixed(&[1])));
        a.konst = Some(std::sync::Arc::new(axes(&[-1])));
        let r = infer(OpKind::ReduceMean, &Attrs::new(), &[Some(&f), Some(&a)]).unwrap();
        assert_eq!(r[0].ty.shape.to_string(), "[B, S, 1]");
        let unknown = Fact::of(TensorType::new(DType::I64, Shape::fixed(&[1])));
        let r = infer(
            OpKind::ReduceMean,
            &Attrs::new(),
            &[Some(&f), Some(&unknown)],
        )
        .unwrap();
        assert_eq!(r[0].ty.shape.rank(), Some(3));
    }
}
