//! The index op family (gather, gather_elements, gather_nd, scatter_elements, scatter_nd,
//! one_hot, non_zero, compress, top_k, trilu): selection by index tensors and
//! data-dependent selection. Shape rules and reference semantics side by side.
//!
//! Index values come from data, so every one is range-checked (negative indices count
//! from the end, as in ONNX) and a bad one is an `Err`.

use super::movement::{
    axis, checked_numel, const_ints, fact, fact_dims, for_each_index, gathered, int_scalar, ints,
    strides, take, take_or, to_size,
};
use super::{arg, not_in_family, opt_arg, Fact};
use crate::{Attrs, DType, Dim, Elem, OpKind, Shape, Tensor};
use std::cmp::Ordering;

/// Shape rule of the index ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let x = arg(inputs, 0)?;
    let dt = x.ty.dtype;
    let xd = x.ty.shape.dims();
    let same = || vec![fact(dt, x.ty.shape.clone())];
    Ok(match op {
        OpKind::Gather => {
            let ind = arg(inputs, 1)?;
            let (Some(d), Some(q)) = (xd, ind.ty.shape.dims()) else {
                return Ok(vec![fact(dt, Shape::unknown())]);
            };
            if d.is_empty() {
                return Err("cannot gather from a scalar".into());
            }
            let a = axis(attrs.int_or("axis", 0)?, d.len())?;
            let mut out = d[..a].to_vec();
            out.extend_from_slice(q);
            out.extend_from_slice(&d[a + 1..]);
            // Picking entries of a shape tensor: `shape(x)[1]` is `S`.
            let mut dims = None;
            if let (1, Some(c), Some(idx)) = (d.len(), x.value_dims(), const_ints(ind)) {
                let mut v = Vec::with_capacity(idx.len());
                for i in idx {
                    v.push(c[norm_index(i, c.len())?].clone());
                }
                dims = Some(v);
            }
            vec![fact_dims(dt, Shape::new(out), dims)]
        }
        OpKind::GatherElements => {
            let ind = arg(inputs, 1)?;
            if let (Some(d), Some(q)) = (xd, ind.ty.shape.dims()) {
                if d.len() != q.len() {
                    return Err(format!(
                        "data rank {} but indices rank {}",
                        d.len(),
                        q.len()
                    ));
                }
                axis(attrs.int_or("axis", 0)?, d.len())?;
            }
            vec![fact(dt, ind.ty.shape.clone())]
        }
        OpKind::GatherND => {
            let ind = arg(inputs, 1)?;
            let b = to_size(attrs.int_or("batch_dims", 0)?, "batch_dims")?;
            let shape = match (xd, ind.ty.shape.dims()) {
                (Some(d), Some(q)) => match q.last() {
                    Some(Dim::Fixed(k)) => {
                        let k = *k as usize;
                        if b >= q.len() || b + k > d.len() {
                            return Err(format!(
                                "indices of last dim {k} and batch_dims {b} do not fit rank {}",
                                d.len()
                            ));
                        }
                        let mut out = q[..q.len() - 1].to_vec();
                        out.extend_from_slice(&d[b + k..]);
                        Shape::new(out)
                    }
                    _ => Shape::unknown(),
                },
                _ => Shape::unknown(),
            };
            vec![fact(dt, shape)]
        }
        OpKind::ScatterElements | OpKind::ScatterND => same(),
        OpKind::OneHot => {
            let depth = arg(inputs, 1)?;
            let values = arg(inputs, 2)?;
            let shape = match x.ty.shape.dims() {
                Some(d) => {
                    let r = d.len() as i64 + 1;
                    let a = attrs.int_or("axis", -1)?;
                    let a = axis(a, r as usize)?;
                    let n = depth
                        .konst
                        .as_ref()
                        .and_then(|k| k.to_f64s().first().copied())
                        .filter(|&v| v >= 0.0)
                        .map(|v| Dim::Fixed(v as u64))
                        .unwrap_or(Dim::Unknown);
                    let mut out = d.to_vec();
                    out.insert(a, n);
                    Shape::new(out)
                }
                None => Shape::unknown(),
            };
            vec![fact(values.ty.dtype, shape)]
        }
        OpKind::NonZero => {
            let r = xd
                .map(|d| Dim::Fixed(d.len() as u64))
                .unwrap_or(Dim::Unknown);
            vec![fact(DType::I64, Shape::new(vec![r, Dim::Unknown]))]
        }
        OpKind::Compress => {
            let shape = match (attrs.int("axis")?, xd) {
                (None, _) => Shape::new(vec![Dim::Unknown]),
                (Some(_), Some([])) => return Err("cannot compress a scalar along an axis".into()),
                (Some(a), Some(d)) => {
                    let a = axis(a, d.len())?;
                    let mut out = d.to_vec();
                    out[a] = Dim::Unknown;
                    Shape::new(out)
                }
                (Some(_), None) => Shape::unknown(),
            };
            vec![fact(dt, shape)]
        }
        OpKind::TopK => {
            let k = arg(inputs, 1)?;
            let shape = match xd {
                Some([]) => return Err("top_k needs rank >= 1".into()),
                Some(d) => {
                    let a = axis(attrs.int_or("axis", -1)?, d.len())?;
                    let mut out = d.to_vec();
                    out[a] = match const_ints(k).as_deref() {
                        Some([k]) => {
                            let k = to_size(*k, "k")? as u64;
                            if let Dim::Fixed(n) = d[a] {
                                if k > n {
                                    return Err(format!("k = {k} exceeds the axis size {n}"));
                                }
                            }
                            Dim::Fixed(k)
                        }
                        _ => Dim::Unknown,
                    };
                    Shape::new(out)
                }
                None => Shape::unknown(),
            };
            vec![fact(dt, shape.clone()), fact(DType::I64, shape)]
        }
        OpKind::Trilu => {
            if let Some(d) = xd {
                if d.len() < 2 {
                    return Err(format!("trilu needs rank >= 2, got {}", d.len()));
                }
            }
            same()
        }
        _ => return Err(not_in_family(op)),
    })
}

/// Reference semantics of the index ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let x = arg(inputs, 0)?;
    let shape = x.shape();
    let rank = x.rank();
    Ok(match op {
        OpKind::Gather => {
            let ind = arg(inputs, 1)?;
            if rank == 0 {
                return Err("cannot gather from a scalar".into());
            }
            let a = axis(attrs.int_or("axis", 0)?, rank)?;
            let n = shape[a];
            let idx = norm_indices(&ints(ind, "indices")?, n)?;
            let outer: usize = shape[..a].iter().product();
            let inner: usize = shape[a + 1..].iter().product();
            let mut out = shape[..a].to_vec();
            out.extend_from_slice(ind.shape());
            out.extend_from_slice(&shape[a + 1..]);
            checked_numel(&out)?;
            let mut map = Vec::with_capacity(outer * idx.len() * inner);
            for o in 0..outer {
                for &i in &idx {
                    let base = (o * n + i) * inner;
                    map.extend(base..base + inner);
                }
            }
            vec![gathered(x, out, &map)?]
        }
        OpKind::GatherElements => {
            let ind = arg(inputs, 1)?;
            let a = axis(attrs.int_or("axis", 0)?, rank)?;
            let map = elements_map(shape, ind, a)?;
            vec![gathered(x, ind.shape().to_vec(), &map)?]
        }
        OpKind::GatherND => {
            let ind = arg(inputs, 1)?;
            let b = to_size(attrs.int_or("batch_dims", 0)?, "batch_dims")?;
            let (out, map) = nd_map(shape, ind, b)?;
            vec![gathered(x, out, &map)?]
        }
        OpKind::ScatterElements => {
            let ind = arg(inputs, 1)?;
            let upd = arg(inputs, 2)?;
            if upd.shape() != ind.shape() {
                return Err(format!(
                    "updates {:?} must have the indices' shape {:?}",
                    upd.shape(),
                    ind.shape()
                ));
            }
            let a = axis(attrs.int_or("axis", 0)?, rank)?;
            let dst = elements_map(shape, ind, a)?;
            let pairs: Vec<(usize, usize)> =
                dst.into_iter().enumerate().map(|(u, d)| (d, u)).collect();
            vec![scatter(x, upd, &pairs, &reduction(attrs)?)?]
        }
        OpKind::ScatterND => {
            let ind = arg(inputs, 1)?;
            let upd = arg(inputs, 2)?;
            let (want, dst) = nd_map(shape, ind, 0)?;
            if upd.shape() != want.as_slice() {
                return Err(format!(
                    "updates {:?} must have shape {want:?}",
                    upd.shape()
                ));
            }
            let pairs: Vec<(usize, usize)> =
                dst.into_iter().enumerate().map(|(u, d)| (d, u)).collect();
            vec![scatter(x, upd, &pairs, &reduction(attrs)?)?]
        }
        OpKind::OneHot => {
            let depth = arg(inputs, 1)?;
            let values = arg(inputs, 2)?;
            if values.len() != 2 {
                return Err(format!("values must have 2 elements, has {}", values.len()));
            }
            let dv = depth.to_f64s();
            let [d] = dv.as_slice() else {
                return Err("depth must be one element".into());
            };
            if !(d.is_finite() && *d >= 0.0) {
                return Err(format!("depth must be non-negative, got {d}"));
            }
            let depth = *d as i64;
            let a = axis(attrs.int_or("axis", -1)?, rank + 1)?;
            let mut out = shape.to_vec();
            out.insert(a, depth as usize);
            checked_numel(&out)?;
            let idx: Vec<i64> = x.to_f64s().into_iter().map(|v| v as i64).collect();
            let inner: usize = shape[a..].iter().product();
            let mut map = Vec::with_capacity(out.iter().product());
            for_each_index(&out, |ix| {
                let j = ix[a] as i64;
                let outer: usize = ix[..a]
                    .iter()
                    .zip(strides(&shape[..a]))
                    .map(|(p, q)| p * q)
                    .sum();
                let rest: usize = ix[a + 1..]
                    .iter()
                    .zip(strides(&shape[a..]))
                    .map(|(p, q)| p * q)
                    .sum();
                let mut v = idx[outer * inner + rest];
                if v < 0 {
                    v += depth;
                }
                map.push(usize::from(v == j));
                Ok(())
            })?;
            vec![Tensor::new(out, take(values.data(), &map)?)?]
        }
        OpKind::NonZero => {
            let nz: Vec<bool> =
                crate::dispatch!(x.data(), v, T => v.iter().map(|&e| e != T::default()).collect());
            let count = nz.iter().filter(|&&b| b).count();
            let mut out = vec![0i64; rank * count];
            let mut j = 0;
            let mut flat = 0;
            for_each_index(shape, |ix| {
                if nz[flat] {
                    for (k, &c) in ix.iter().enumerate() {
                        out[k * count + j] = c as i64;
                    }
                    j += 1;
                }
                flat += 1;
                Ok(())
            })?;
            vec![Tensor::from_vec(vec![rank, count], out)]
        }
        OpKind::Compress => {
            let cond = arg(inputs, 1)?;
            if cond.rank() != 1 {
                return Err("condition must be 1-D".into());
            }
            let c: Vec<bool> = cond.to_f64s().into_iter().map(|v| v != 0.0).collect();
            let (view, a): (Vec<usize>, usize) = match attrs.int("axis")? {
                Some(_) if rank == 0 => return Err("cannot compress a scalar along an axis".into()),
                Some(a) => (shape.to_vec(), axis(a, rank)?),
                None => (vec![x.len()], 0),
            };
            let n = view[a];
            let picked: Vec<usize> = c
                .iter()
                .enumerate()
                .filter(|(_, &b)| b)
                .map(|(i, _)| i)
                .collect();
            if let Some(&i) = picked.iter().find(|&&i| i >= n) {
                return Err(format!("condition selects index {i} of an axis of {n}"));
            }
            let outer: usize = view[..a].iter().product();
            let inner: usize = view[a + 1..].iter().product();
            let mut out = view.clone();
            out[a] = picked.len();
            let mut map = Vec::with_capacity(out.iter().product());
            for o in 0..outer {
                for &i in &picked {
                    let base = (o * n + i) * inner;
                    map.extend(base..base + inner);
                }
            }
            vec![gathered(x, out, &map)?]
        }
        OpKind::TopK => {
            let k = to_size(int_scalar(arg(inputs, 1)?, "k")?, "k")?;
            let a = axis(attrs.int_or("axis", -1)?, rank)?;
            if rank == 0 {
                return Err("top_k needs rank >= 1".into());
            }
            let n = shape[a];
            if k > n {
                return Err(format!("k = {k} exceeds the axis size {n}"));
            }
            let largest = attrs.int_or("largest", 1)? != 0;
            let outer: usize = shape[..a].iter().product();
            let inner: usize = shape[a + 1..].iter().product();
            let mut out = shape.to_vec();
            out[a] = k;
            let mut map = vec![0usize; outer * k * inner];
            let mut idx_out = vec![0i64; outer * k * inner];
            crate::dispatch!(x.data(), v, T => {
                let mut line: Vec<usize> = Vec::with_capacity(n);
                for o in 0..outer {
                    for i in 0..inner {
                        line.clear();
                        line.extend(0..n);
                        let at = |j: usize| v[(o * n + j) * inner + i];
                        line.sort_by(|&p, &q| {
                            let c = total_cmp(&at(p), &at(q));
                            let c = if largest { c.reverse() } else { c };
                            c.then(p.cmp(&q))
                        });
                        for (r, &j) in line[..k].iter().enumerate() {
                            let dst = (o * k + r) * inner + i;
                            map[dst] = (o * n + j) * inner + i;
                            idx_out[dst] = j as i64;
                        }
                    }
                }
            });
            vec![
                gathered(x, out.clone(), &map)?,
                Tensor::from_vec(out, idx_out),
            ]
        }
        OpKind::Trilu => {
            if rank < 2 {
                return Err(format!("trilu needs rank >= 2, got {rank}"));
            }
            let k = match opt_arg(inputs, 1) {
                Some(t) => int_scalar(t, "k")?,
                None => 0,
            };
            let upper = attrs.int_or("upper", 1)? != 0;
            let (r, c) = (shape[rank - 2], shape[rank - 1]);
            let mut map = Vec::with_capacity(x.len());
            for flat in 0..x.len() {
                let i = ((flat / c.max(1)) % r.max(1)) as i64;
                let j = (flat % c.max(1)) as i64;
                let d = j.saturating_sub(i);
                let keep = if upper { d >= k } else { d <= k };
                map.push(keep.then_some(flat));
            }
            let zero = Tensor::zeros(x.dtype(), vec![]);
            vec![Tensor::new(
                shape.to_vec(),
                take_or(x.data(), &map, zero.data())?,
            )?]
        }
        _ => return Err(not_in_family(op)),
    })
}

/// An index into an axis of `n`, negative counting from the end.
fn norm_index(i: i64, n: usize) -> Result<usize, String> {
    let j = if i < 0 { i + n as i64 } else { i };
    if j < 0 || j >= n as i64 {
        return Err(format!("index {i} is out of range for an axis of {n}"));
    }
    Ok(j as usize)
}

fn norm_indices(idx: &[i64], n: usize) -> Result<Vec<usize>, String> {
    idx.iter().map(|&i| norm_index(i, n)).collect()
}

/// A total order on elements: NaN (the only value unequal to itself) above everything.
fn total_cmp<T: PartialOrd>(a: &T, b: &T) -> Ordering {
    #[allow(clippy::eq_op)]
    match (a != a, b != b) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(b).unwrap_or(Ordering::Equal),
    }
}

/// For gather_elements / scatter_elements: the flat data offset each index addresses.
fn elements_map(shape: &[usize], ind: &Tensor, a: usize) -> Result<Vec<usize>, String> {
    let q = ind.shape();
    if q.len() != shape.len() {
        return Err(format!(
            "data rank {} but indices rank {}",
            shape.len(),
            q.len()
        ));
    }
    for k in 0..q.len() {
        if k != a && q[k] > shape[k] {
            return Err(format!("indices shape {q:?} exceeds data shape {shape:?}"));
        }
    }
    let idx = ints(ind, "indices")?;
    let st = strides(shape);
    let mut map = Vec::with_capacity(idx.len());
    let mut flat = 0;
    for_each_index(q, |ix| {
        let mut off = 0;
        for k in 0..ix.len() {
            let c = if k == a {
                norm_index(idx[flat], shape[a])?
            } else {
                ix[k]
            };
            off += c * st[k];
        }
        map.push(off);
        flat += 1;
        Ok(())
    })?;
    Ok(map)
}

/// For gather_nd / scatter_nd: the output (or updates) shape and, per element, the flat
/// data offset it addresses.
fn nd_map(shape: &[usize], ind: &Tensor, b: usize) -> Result<(Vec<usize>, Vec<usize>), String> {
    let q = ind.shape();
    let m = q.len();
    let r = shape.len();
    let k = *q.last().ok_or("indices must have rank >= 1")?;
    if b >= m || b + k > r {
        return Err(format!(
            "indices {q:?} with batch_dims {b} do not fit data of rank {r}"
        ));
    }
    if q[..b] != shape[..b] {
        return Err(format!(
            "batch dims of indices {q:?} and data {shape:?} differ"
        ));
    }
    let idx = ints(ind, "indices")?;
    let st = strides(shape);
    let inner: usize = shape[b + k..].iter().product();
    let mut out = q[..m - 1].to_vec();
    out.extend_from_slice(&shape[b + k..]);
    checked_numel(&out)?;
    let mut map = Vec::with_capacity(out.iter().product());
    let mut t = 0;
    for_each_index(&q[..m - 1], |ix| {
        let mut off = 0;
        for (j, &c) in ix[..b].iter().enumerate() {
            off += c * st[j];
        }
        for j in 0..k {
            off += norm_index(idx[t * k + j], shape[b + j])? * st[b + j];
        }
        map.extend(off..off + inner);
        t += 1;
        Ok(())
    })?;
    Ok((out, map))
}

/// How scatter combines an update with the element already there.
enum Reduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

fn reduction(attrs: &Attrs) -> Result<Reduction, String> {
    Ok(
        match attrs.string_or("reduction", "none".into())?.as_str() {
            "none" => Reduction::None,
            "add" => Reduction::Add,
            "mul" => Reduction::Mul,
            "max" => Reduction::Max,
            "min" => Reduction::Min,
            r => return Err(format!("unknown reduction `{r}`")),
        },
    )
}

/// Element arithmetic scatter reductions need: wrapping for ints, or/and for bool.
trait Arith: Elem {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
}

macro_rules! arith_int {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
        }
    )*};
}
arith_int!(i8, i16, i32, i64, u8, u16, u32, u64);

macro_rules! arith_float {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn add(self, o: Self) -> Self { self + o }
            fn mul(self, o: Self) -> Self { self * o }
        }
    )*};
}
arith_float!(f32, f64, half::f16, half::bf16);

impl Arith for bool {
    fn add(self, o: Self) -> Self {
        self || o
    }
    fn mul(self, o: Self) -> Self {
        self && o
    }
}

fn combine<T: Arith>(r: &Reduction, a: T, b: T) -> T {
    match r {
        Reduction::None => b,
        Reduction::Add => a.add(b),
        Reduction::Mul => a.mul(b),
        Reduction::Max => {
            if total_cmp(&b, &a) == Ordering::Greater {
                b
            } else {
                a
            }
        }
        Reduction::Min => {
            if total_cmp(&b, &a) == Ordering::Less {
                b
            } else {
                a
            }
        }
    }
}

/// A copy of `x` with `updates[u]` combined into element `d` for each `(d, u)` in order.
fn scatter(
    x: &Tensor,
    updates: &Tensor,
    pairs: &[(usize, usize)],
    r: &Reduction,
) -> Result<Tensor, String> {
    if updates.dtype() != x.dtype() {
        return Err(format!(
            "updates are {} but data is {}",
            updates.dtype(),
            x.dtype()
        ));
    }
    let data = crate::dispatch!(x.data(), v, T => {
        let u = <T as Elem>::unwrap(updates.data()).ok_or("dtype mismatch")?;
        let mut out = v.clone();
        for &(d, i) in pairs {
            let (Some(&a), Some(&b)) = (out.get(d), u.get(i)) else {
                return Err(format!("scatter index {d} out of range"));
            };
            out[d] = combine(r, a, b);
        }
        <T as Elem>::wrap_buf(out)
    });
    Tensor::new(x.shape().to_vec(), data)
}
