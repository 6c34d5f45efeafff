//! The layout op family (shape, size, reshape, flatten, squeeze, unsqueeze, transpose,
//! concat, split, slice, expand, tile, pad, depth_to_space, space_to_depth,
//! reverse_sequence): shape queries and data movement. Shape rules and reference
//! semantics side by side.
//!
//! The shape rules carry `Fact::dims` (the symbolic contents of small integer tensors)
//! through shape, squeeze, unsqueeze, concat, slice and reshape, so that exporter chains
//! such as `shape -> gather -> unsqueeze -> concat -> reshape` keep `B` and `S` symbolic.

use super::movement::{
    axis, check_perm, checked_numel, const_ints, dim_mul, dim_product, dims_or_len, fact,
    fact_dims, for_each_index, gathered, ints, norm_axes, strides, take_or, to_size, transpose_map,
    unify, Mono,
};
use super::{arg, not_in_family, opt_arg, Fact};
use crate::shape::{broadcast, broadcast_concrete};
use crate::{Attrs, DType, Dim, OpKind, Shape, Tensor};

/// Shape rule of the layout ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let x = arg(inputs, 0)?;
    let dt = x.ty.dtype;
    let xd = x.ty.shape.dims();
    let same = || vec![fact(dt, x.ty.shape.clone())];
    Ok(match op {
        OpKind::Shape => match xd {
            Some(d) => {
                let (s, e) = shape_bounds(d.len(), attrs)?;
                let dims = d[s..e].to_vec();
                vec![fact_dims(DType::I64, Shape::fixed(&[e - s]), Some(dims))]
            }
            None => vec![fact(DType::I64, Shape::new(vec![Dim::Unknown]))],
        },
        OpKind::Size => {
            let n = xd.map(dim_product).unwrap_or(Dim::Unknown);
            let dims = (n != Dim::Unknown).then(|| vec![n]);
            vec![fact_dims(DType::I64, Shape::new(vec![]), dims)]
        }
        OpKind::Reshape => vec![infer_reshape(x, arg(inputs, 1)?, attrs)?],
        OpKind::Flatten => match xd {
            Some(d) => {
                let a = flatten_axis(attrs, d.len())?;
                let shape = Shape::new(vec![dim_product(&d[..a]), dim_product(&d[a..])]);
                vec![fact_dims(dt, shape, x.value_dims())]
            }
            None => {
                flatten_axis(attrs, usize::MAX / 2)?;
                vec![fact(dt, Shape::unknown_of_rank(2))]
            }
        },
        OpKind::Squeeze => {
            let axes = opt_arg(inputs, 1);
            let shape = match (xd, axes) {
                (None, _) => Shape::unknown(),
                (Some(d), None) => {
                    if d.iter().all(|d| d.fixed().is_some()) {
                        Shape::new(d.iter().filter(|d| **d != Dim::Fixed(1)).cloned().collect())
                    } else {
                        Shape::unknown()
                    }
                }
                (Some(d), Some(a)) => match const_ints(a) {
                    None => match a.ty.shape.dims() {
                        Some([Dim::Fixed(n)]) if (*n as usize) <= d.len() => {
                            Shape::unknown_of_rank(d.len() - *n as usize)
                        }
                        _ => Shape::unknown(),
                    },
                    Some(axes) => {
                        let axes = norm_axes(&axes, d.len())?;
                        for &a in &axes {
                            if let Dim::Fixed(n) = d[a] {
                                if n != 1 {
                                    return Err(format!("cannot squeeze axis {a} of size {n}"));
                                }
                            }
                        }
                        Shape::new(
                            (0..d.len())
                                .filter(|i| !axes.contains(i))
                                .map(|i| d[i].clone())
                                .collect(),
                        )
                    }
                },
            };
            vec![fact_dims(dt, shape, x.value_dims())]
        }
        OpKind::Unsqueeze => {
            let a = arg(inputs, 1)?;
            let shape = match (xd, const_ints(a)) {
                (None, _) => Shape::unknown(),
                (Some(d), Some(axes)) => Shape::new(unsqueeze_dims(d, &axes, Dim::Fixed(1))?),
                (Some(d), None) => match a.ty.shape.dims() {
                    Some([Dim::Fixed(n)]) => Shape::unknown_of_rank(d.len() + *n as usize),
                    _ => Shape::unknown(),
                },
            };
            vec![fact_dims(dt, shape, x.value_dims())]
        }
        OpKind::Transpose => match xd {
            Some(d) => {
                let perm = perm_attr(attrs, d.len())?;
                vec![fact(
                    dt,
                    Shape::new(perm.iter().map(|&p| d[p].clone()).collect()),
                )]
            }
            None => same(),
        },
        OpKind::Concat => vec![infer_concat(attrs, inputs)?],
        OpKind::Split => infer_split(x, attrs, inputs)?,
        OpKind::Slice => vec![infer_slice(x, inputs)?],
        OpKind::Expand => {
            let s = arg(inputs, 1)?;
            let shape = match dims_or_len(s) {
                Some(t) => broadcast(&x.ty.shape, &Shape::new(t))?,
                None => Shape::unknown(),
            };
            vec![fact(dt, shape)]
        }
        OpKind::Tile => {
            let r = arg(inputs, 1)?;
            let shape = match (xd, const_ints(r)) {
                (Some(d), Some(reps)) => {
                    if reps.len() != d.len() {
                        return Err(format!("{} repeats for rank {}", reps.len(), d.len()));
                    }
                    let mut out = Vec::with_capacity(d.len());
                    for (d, &k) in d.iter().zip(&reps) {
                        out.push(dim_mul(d, to_size(k, "repeats")? as u64));
                    }
                    Shape::new(out)
                }
                (Some(d), None) => Shape::unknown_of_rank(d.len()),
                (None, _) => Shape::unknown(),
            };
            vec![fact(dt, shape)]
        }
        OpKind::Pad => {
            let shape = match xd {
                None => Shape::unknown(),
                Some(d) => {
                    let pads = const_ints(arg(inputs, 1)?);
                    let axes = match opt_arg(inputs, 3) {
                        None => Some((0..d.len() as i64).collect::<Vec<_>>()),
                        Some(a) => const_ints(a),
                    };
                    match (pads, axes) {
                        (Some(p), Some(a)) => {
                            let per = pad_amounts(&p, &a, d.len())?;
                            let mut out = Vec::with_capacity(d.len());
                            for (dim, (b, e)) in d.iter().zip(per) {
                                out.push(match dim {
                                    Dim::Fixed(n) => {
                                        let m = *n as i64 + b + e;
                                        if m < 0 {
                                            return Err(format!(
                                                "pads {b}, {e} crop past size {n}"
                                            ));
                                        }
                                        Dim::Fixed(m as u64)
                                    }
                                    _ if b == 0 && e == 0 => dim.clone(),
                                    _ => Dim::Unknown,
                                });
                            }
                            Shape::new(out)
                        }
                        _ => Shape::unknown_of_rank(d.len()),
                    }
                }
            };
            vec![fact(dt, shape)]
        }
        OpKind::DepthToSpace | OpKind::SpaceToDepth => {
            let b = attrs.req_int("blocksize")?;
            if b <= 0 {
                return Err(format!("blocksize must be positive, got {b}"));
            }
            let b = b as u64;
            let shape = match xd {
                None => Shape::unknown_of_rank(4),
                Some([n, c, h, w]) => {
                    let bb = b * b;
                    let div = |d: &Dim, k: u64| -> Result<Dim, String> {
                        match d {
                            Dim::Fixed(x) if x % k != 0 => {
                                Err(format!("size {x} is not divisible by {k}"))
                            }
                            Dim::Fixed(x) => Ok(Dim::Fixed(x / k)),
                            _ if k == 1 => Ok(d.clone()),
                            _ => Ok(Dim::Unknown),
                        }
                    };
                    if op == OpKind::DepthToSpace {
                        Shape::new(vec![n.clone(), div(c, bb)?, dim_mul(h, b), dim_mul(w, b)])
                    } else {
                        Shape::new(vec![n.clone(), dim_mul(c, bb), div(h, b)?, div(w, b)?])
                    }
                }
                Some(d) => return Err(format!("input must have rank 4, not {}", d.len())),
            };
            vec![fact(dt, shape)]
        }
        OpKind::ReverseSequence => same(),
        _ => return Err(not_in_family(op)),
    })
}

/// Reference semantics of the layout ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let x = arg(inputs, 0)?;
    let shape = x.shape();
    let rank = x.rank();
    Ok(match op {
        OpKind::Shape => {
            let (s, e) = shape_bounds(rank, attrs)?;
            let v: Vec<i64> = shape[s..e].iter().map(|&d| d as i64).collect();
            vec![Tensor::from_vec(vec![v.len()], v)]
        }
        OpKind::Size => vec![Tensor::scalar(x.len() as i64)],
        OpKind::Reshape => {
            let target = ints(arg(inputs, 1)?, "shape")?;
            let allowzero = attrs.int_or("allowzero", 0)? != 0;
            let out = reshape_target(shape, &target, allowzero)?;
            vec![x.clone().reshaped(out)?]
        }
        OpKind::Flatten => {
            let a = flatten_axis(attrs, rank)?;
            let out = vec![shape[..a].iter().product(), shape[a..].iter().product()];
            vec![x.clone().reshaped(out)?]
        }
        OpKind::Squeeze => {
            let out: Vec<usize> = match opt_arg(inputs, 1) {
                None => shape.iter().copied().filter(|&d| d != 1).collect(),
                Some(a) => {
                    let axes = norm_axes(&ints(a, "axes")?, rank)?;
                    for &a in &axes {
                        if shape[a] != 1 {
                            return Err(format!("cannot squeeze axis {a} of size {}", shape[a]));
                        }
                    }
                    (0..rank)
                        .filter(|i| !axes.contains(i))
                        .map(|i| shape[i])
                        .collect()
                }
            };
            vec![x.clone().reshaped(out)?]
        }
        OpKind::Unsqueeze => {
            let axes = ints(arg(inputs, 1)?, "axes")?;
            let out = unsqueeze_dims(shape, &axes, 1)?;
            vec![x.clone().reshaped(out)?]
        }
        OpKind::Transpose => {
            let perm = perm_attr(attrs, rank)?;
            let (map, out) = transpose_map(shape, &perm);
            vec![gathered(x, out, &map)?]
        }
        OpKind::Concat => {
            let ts: Vec<&Tensor> = inputs.iter().flatten().copied().collect();
            vec![concat(&ts, attrs.req_int("axis")?)?]
        }
        OpKind::Split => {
            if rank == 0 {
                return Err("cannot split a scalar".into());
            }
            let axis = axis(attrs.int_or("axis", 0)?, rank)?;
            let n = shape.get(axis).copied().unwrap_or(0);
            let sizes = match opt_arg(inputs, 1) {
                Some(s) => {
                    let v = ints(s, "split")?;
                    let mut sizes = Vec::with_capacity(v.len());
                    for x in v {
                        sizes.push(to_size(x, "split sizes")?);
                    }
                    if sizes.iter().try_fold(0usize, |a, &b| a.checked_add(b)) != Some(n) {
                        return Err(format!("split {sizes:?} does not sum to {n}"));
                    }
                    sizes
                }
                None => equal_split(n, num_outputs(attrs)?)?,
            };
            let mut outs = Vec::with_capacity(sizes.len());
            let mut start = 0;
            for len in sizes {
                outs.push(narrow(x, axis, start, len)?);
                start += len;
            }
            outs
        }
        OpKind::Slice => vec![eval_slice(x, inputs)?],
        OpKind::Expand => {
            let target = ints(arg(inputs, 1)?, "shape")?;
            let mut t = Vec::with_capacity(target.len());
            for d in target {
                t.push(to_size(d, "expand shape")?);
            }
            let out = broadcast_concrete(shape, &t)
                .ok_or_else(|| format!("cannot expand {shape:?} to {t:?}"))?;
            checked_numel(&out)?;
            let map = broadcast_map(shape, &out);
            vec![gathered(x, out, &map)?]
        }
        OpKind::Tile => {
            let reps = ints(arg(inputs, 1)?, "repeats")?;
            if reps.len() != rank {
                return Err(format!("{} repeats for rank {rank}", reps.len()));
            }
            let mut out = Vec::with_capacity(rank);
            for (&d, &r) in shape.iter().zip(&reps) {
                out.push(
                    d.checked_mul(to_size(r, "repeats")?)
                        .ok_or("tiled shape overflows")?,
                );
            }
            checked_numel(&out)?;
            let st = strides(shape);
            let mut map = Vec::new();
            for_each_index(&out, |ix| {
                map.push((0..rank).map(|k| (ix[k] % shape[k]) * st[k]).sum());
                Ok(())
            })?;
            vec![gathered(x, out, &map)?]
        }
        OpKind::Pad => vec![eval_pad(x, attrs, inputs)?],
        OpKind::DepthToSpace | OpKind::SpaceToDepth => {
            let b = attrs.req_int("blocksize")?;
            let b = usize::try_from(b)
                .ok()
                .filter(|&b| b > 0)
                .ok_or_else(|| format!("blocksize must be positive, got {b}"))?;
            let [n, c, h, w] = *shape else {
                return Err(format!("input must have rank 4, not {rank}"));
            };
            let (six, perm, out) = if op == OpKind::DepthToSpace {
                if c % (b * b) != 0 {
                    return Err(format!(
                        "channels {c} not divisible by blocksize² {}",
                        b * b
                    ));
                }
                let cb = c / (b * b);
                let out = vec![n, cb, h * b, w * b];
                match attrs.string_or("mode", "DCR".into())?.as_str() {
                    "DCR" => (vec![n, b, b, cb, h, w], [0, 3, 4, 1, 5, 2], out),
                    "CRD" => (vec![n, cb, b, b, h, w], [0, 1, 4, 2, 5, 3], out),
                    m => return Err(format!("unknown depth_to_space mode `{m}`")),
                }
            } else {
                if h % b != 0 || w % b != 0 {
                    return Err(format!("spatial {h}x{w} not divisible by blocksize {b}"));
                }
                let out = vec![n, c * b * b, h / b, w / b];
                (vec![n, c, h / b, b, w / b, b], [0, 3, 5, 1, 2, 4], out)
            };
            let (map, _) = transpose_map(&six, &perm);
            vec![gathered(x, out, &map)?]
        }
        OpKind::ReverseSequence => {
            let lens = ints(arg(inputs, 1)?, "sequence_lens")?;
            let b_ax = axis(attrs.int_or("batch_axis", 1)?, rank)?;
            let t_ax = axis(attrs.int_or("time_axis", 0)?, rank)?;
            if rank < 2 || b_ax == t_ax {
                return Err("batch_axis and time_axis must be two different axes".into());
            }
            if lens.len() != shape[b_ax] {
                return Err(format!(
                    "{} sequence_lens for batch {}",
                    lens.len(),
                    shape[b_ax]
                ));
            }
            for &l in &lens {
                if l < 0 || l as usize > shape[t_ax] {
                    return Err(format!("sequence length {l} outside 0..={}", shape[t_ax]));
                }
            }
            let st = strides(shape);
            let mut map = Vec::with_capacity(x.len());
            for_each_index(shape, |ix| {
                let l = lens[ix[b_ax]] as usize;
                let t = ix[t_ax];
                let src_t = if t < l { l - 1 - t } else { t };
                let mut off: usize = ix.iter().zip(&st).map(|(a, b)| a * b).sum();
                off = off - t * st[t_ax] + src_t * st[t_ax];
                map.push(off);
                Ok(())
            })?;
            vec![gathered(x, shape.to_vec(), &map)?]
        }
        _ => return Err(not_in_family(op)),
    })
}

// ---- shape, flatten, transpose

/// The `[start, end)` range of dims `shape` reports, clamped as ONNX does.
fn shape_bounds(rank: usize, attrs: &Attrs) -> Result<(usize, usize), String> {
    let r = rank as i64;
    let clamp = |v: i64| (if v < 0 { v.saturating_add(r) } else { v }).clamp(0, r) as usize;
    let s = clamp(attrs.int_or("start", 0)?);
    let e = clamp(attrs.int_or("end", r)?);
    Ok((s, e.max(s)))
}

fn flatten_axis(attrs: &Attrs, rank: usize) -> Result<usize, String> {
    let a = attrs.int_or("axis", 1)?;
    let r = rank as i64;
    let n = if a < 0 { a + r } else { a };
    if n < 0 || n > r {
        return Err(format!("flatten axis {a} is out of range for rank {rank}"));
    }
    Ok(n as usize)
}

fn perm_attr(attrs: &Attrs, rank: usize) -> Result<Vec<usize>, String> {
    match attrs.ints("perm")? {
        Some(p) => check_perm(&p, rank),
        None => Ok((0..rank).rev().collect()),
    }
}

/// Inserts `one` at the (output-rank-relative) `axes`.
fn unsqueeze_dims<D: Clone>(d: &[D], axes: &[i64], one: D) -> Result<Vec<D>, String> {
    let out_rank = d.len() + axes.len();
    let axes = norm_axes(axes, out_rank)?;
    let mut src = d.iter();
    let mut out = Vec::with_capacity(out_rank);
    for i in 0..out_rank {
        if axes.contains(&i) {
            out.push(one.clone());
        } else {
            out.push(src.next().ok_or("unsqueeze axes do not fit")?.clone());
        }
    }
    Ok(out)
}

// ---- reshape

/// The concrete output shape of a reshape (`0` copies unless `allowzero`, `-1` infers).
fn reshape_target(shape: &[usize], target: &[i64], allowzero: bool) -> Result<Vec<usize>, String> {
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &t) in target.iter().enumerate() {
        out.push(match t {
            -1 => {
                if infer_at.replace(i).is_some() {
                    return Err(format!("shape {target:?} has more than one -1"));
                }
                1
            }
            0 if !allowzero => *shape
                .get(i)
                .ok_or_else(|| format!("shape {target:?} copies dim {i} the input lacks"))?,
            t => to_size(t, "reshape sizes")?,
        });
    }
    if allowzero && infer_at.is_some() && target.contains(&0) {
        return Err("shape with allowzero has both 0 and -1".into());
    }
    let total: usize = shape.iter().product();
    let known = out
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or("reshape target overflows")?;
    if let Some(i) = infer_at {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {shape:?} to {target:?}"));
        }
        out[i] = total / known;
    } else if known != total {
        return Err(format!(
            "cannot reshape {shape:?} ({total} elements) to {target:?}"
        ));
    }
    Ok(out)
}

fn infer_reshape(x: &Fact, s: &Fact, attrs: &Attrs) -> Result<Fact, String> {
    let dt = x.ty.dtype;
    let allowzero = attrs.int_or("allowzero", 0)? != 0;
    let Some(target) = dims_or_len(s) else {
        return Ok(fact(dt, Shape::unknown()));
    };
    let raw = const_ints(s);
    let xd = x.ty.shape.dims();
    let mut out = Vec::with_capacity(target.len());
    let mut holes = vec![];
    for (i, t) in target.iter().enumerate() {
        let is_minus_one = raw.as_ref().and_then(|r| r.get(i)) == Some(&-1);
        let d = match t {
            Dim::Fixed(0) if !allowzero => match xd {
                Some(xd) => xd
                    .get(i)
                    .cloned()
                    .ok_or_else(|| format!("shape copies dim {i} the input lacks"))?,
                None => Dim::Unknown,
            },
            _ if is_minus_one => Dim::Unknown,
            t => t.clone(),
        };
        if d == Dim::Unknown {
            holes.push(i);
        }
        out.push(d);
    }
    // One unknown entry (a -1, or a size not known here) is fixed by the element count:
    // whatever it is, the product must match the input's.
    if let (Some(xd), [hole]) = (xd, holes.as_slice()) {
        let others: Vec<Dim> = out
            .iter()
            .enumerate()
            .filter(|(i, _)| i != hole)
            .map(|(_, d)| d.clone())
            .collect();
        if let (Some(total), Some(known)) = (Mono::of(xd), Mono::of(&others)) {
            if let Some(q) = total.div(&known) {
                out[*hole] = q.to_dim();
            }
        }
    }
    if let (Some(xd), Some(_)) = (xd.and_then(Mono::of), Mono::of(&out)) {
        let a = xd.to_dim();
        let b = dim_product(&out);
        if let (Dim::Fixed(p), Dim::Fixed(q)) = (a, b) {
            if p != q {
                return Err(format!(
                    "cannot reshape {} elements to {}",
                    p,
                    Shape::new(out)
                ));
            }
        }
    }
    Ok(fact_dims(dt, Shape::new(out), x.value_dims()))
}

// ---- concat, split

fn infer_concat(attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Fact, String> {
    let ins: Vec<&Fact> = inputs.iter().flatten().copied().collect();
    let first = ins.first().ok_or("concat needs at least one input")?;
    let dt = first.ty.dtype;
    for f in &ins {
        if f.ty.dtype != dt {
            return Err(format!("inputs of dtypes {dt} and {}", f.ty.dtype));
        }
    }
    let ax = attrs.req_int("axis")?;
    let Some(rank) = ins.iter().find_map(|f| f.ty.shape.rank()) else {
        return Ok(fact(dt, Shape::unknown()));
    };
    let a = axis(ax, rank)?;
    let mut out: Vec<Dim> = vec![Dim::Unknown; rank];
    let mut total = Some(0u64);
    for f in &ins {
        let Some(d) = f.ty.shape.dims() else {
            total = None;
            continue;
        };
        if d.len() != rank {
            return Err(format!("inputs of ranks {rank} and {}", d.len()));
        }
        for (k, dk) in d.iter().enumerate() {
            if k == a {
                total = match (total, dk) {
                    (Some(t), Dim::Fixed(n)) => t.checked_add(*n),
                    _ => None,
                };
            } else {
                out[k] = unify(&out[k], dk)?;
            }
        }
    }
    out[a] = total.map(Dim::Fixed).unwrap_or(Dim::Unknown);
    if ins.len() == 1 {
        if let Some(d) = ins[0].ty.shape.dims() {
            out[a] = d[a].clone();
        }
    }
    // Contents of 1-D shape tensors concatenate.
    let dims = if rank == 1 {
        let mut v = vec![];
        let mut ok = true;
        for f in &ins {
            match dims_or_len(f) {
                Some(d) => v.extend(d),
                None => ok = false,
            }
        }
        ok.then_some(v)
    } else {
        None
    };
    Ok(fact_dims(dt, Shape::new(out), dims))
}

fn concat(ts: &[&Tensor], ax: i64) -> Result<Tensor, String> {
    let first = ts.first().ok_or("concat needs at least one input")?;
    let rank = first.rank();
    if rank == 0 {
        return Err("cannot concat scalars".into());
    }
    let a = axis(ax, rank)?;
    let mut out_shape = first.shape().to_vec();
    out_shape[a] = 0;
    for t in ts {
        if t.dtype() != first.dtype() || t.rank() != rank {
            return Err(format!(
                "inputs {}{:?} and {}{:?} do not concat",
                first.dtype(),
                first.shape(),
                t.dtype(),
                t.shape()
            ));
        }
        for k in 0..rank {
            if k != a && t.shape()[k] != first.shape()[k] {
                return Err(format!(
                    "shapes {:?} and {:?} differ off axis {a}",
                    first.shape(),
                    t.shape()
                ));
            }
        }
        out_shape[a] += t.shape()[a];
    }
    let outer: usize = out_shape[..a].iter().product();
    let inner: usize = out_shape[a + 1..].iter().product();
    crate::dispatch!(first.data(), _v, T => {
        let mut parts: Vec<(&[T], usize)> = Vec::with_capacity(ts.len());
        for t in ts {
            let v = <T as crate::Elem>::unwrap(t.data()).ok_or("dtype mismatch")?;
            parts.push((v.as_slice(), t.shape()[a] * inner));
        }
        let mut out: Vec<T> = Vec::with_capacity(out_shape.iter().product());
        for o in 0..outer {
            for &(p, c) in &parts {
                out.extend_from_slice(&p[o * c..(o + 1) * c]);
            }
        }
        Tensor::new(out_shape, <T as crate::Elem>::wrap(out))
    })
}

fn num_outputs(attrs: &Attrs) -> Result<usize, String> {
    let n = attrs
        .int("num_outputs")?
        .ok_or("split needs a `split` input or a `num_outputs` attribute")?;
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("num_outputs must be positive, got {n}"))
}

/// Sizes of `n` split into `k` chunks of `ceil(n / k)`, the last one smaller.
fn equal_split(n: usize, k: usize) -> Result<Vec<usize>, String> {
    let c = n.div_ceil(k);
    let rest = n
        .checked_sub(c * (k - 1))
        .ok_or_else(|| format!("cannot split {n} into {k} chunks of {c}"))?;
    let mut v = vec![c; k - 1];
    v.push(rest);
    Ok(v)
}

fn infer_split(x: &Fact, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let dt = x.ty.dtype;
    let split = opt_arg(inputs, 1);
    let count = match split {
        Some(s) => match dims_or_len(s) {
            Some(d) => d.len(),
            None => return Err("split sizes of unknown length".into()),
        },
        None => num_outputs(attrs)?,
    };
    let Some(d) = x.ty.shape.dims() else {
        return Ok(vec![fact(dt, Shape::unknown()); count]);
    };
    if d.is_empty() {
        return Err("cannot split a scalar".into());
    }
    let a = axis(attrs.int_or("axis", 0)?, d.len())?;
    let sizes: Vec<Dim> = match split {
        Some(s) => {
            let sizes = s.value_dims().unwrap_or(vec![Dim::Unknown; count]);
            if let (Some(n), Some(Dim::Fixed(m))) = (
                sizes
                    .iter()
                    .try_fold(0u64, |a, d| d.fixed().and_then(|b| a.checked_add(b))),
                d.get(a),
            ) {
                if n != *m {
                    return Err(format!("split sizes sum to {n}, the axis has {m}"));
                }
            }
            sizes
        }
        None => match &d[a] {
            Dim::Fixed(n) => equal_split(*n as usize, count)?
                .into_iter()
                .map(|c| Dim::Fixed(c as u64))
                .collect(),
            other if count == 1 => vec![other.clone()],
            _ => vec![Dim::Unknown; count],
        },
    };
    Ok(sizes
        .into_iter()
        .map(|s| {
            let mut o = d.to_vec();
            o[a] = s;
            fact(dt, Shape::new(o))
        })
        .collect())
}

/// Elements `start..start + len` of `x` along `axis`.
fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor, String> {
    let mut out = x.shape().to_vec();
    out[axis] = len;
    let st = strides(x.shape());
    let mut map = Vec::with_capacity(out.iter().product());
    for_each_index(&out, |ix| {
        map.push(
            ix.iter()
                .zip(&st)
                .enumerate()
                .map(|(k, (&i, &s))| if k == axis { (i + start) * s } else { i * s })
                .sum(),
        );
        Ok(())
    })?;
    gathered(x, out, &map)
}

// ---- slice

/// Slice parameters per axis: (axis, start, end, step). Shared with the runtime's native
/// slice, so both read the inputs the same way.
pub fn slice_params(
    rank: usize,
    starts: &[i64],
    ends: &[i64],
    axes: Option<Vec<i64>>,
    steps: Option<Vec<i64>>,
) -> Result<Vec<(usize, i64, i64, i64)>, String> {
    let n = starts.len();
    if ends.len() != n {
        return Err(format!("{n} starts but {} ends", ends.len()));
    }
    let axes = match axes {
        Some(a) => norm_axes(&a, rank)?,
        None => (0..n).collect(),
    };
    let steps = steps.unwrap_or(vec![1; n]);
    if axes.len() != n || steps.len() != n {
        return Err(format!(
            "{n} starts, {} axes and {} steps must agree",
            axes.len(),
            steps.len()
        ));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if steps[i] == 0 {
            return Err("slice step must not be 0".into());
        }
        if axes[i] >= rank {
            return Err(format!(
                "slice axis {} out of range for rank {rank}",
                axes[i]
            ));
        }
        out.push((axes[i], starts[i], ends[i], steps[i]));
    }
    Ok(out)
}

/// The effective first index and element count of a slice of a dim of size `n`.
pub fn slice_range(n: usize, start: i64, end: i64, step: i64) -> (i64, usize) {
    let n = n as i128;
    let (step, mut s, mut e) = (step as i128, start as i128, end as i128);
    if s < 0 {
        s += n;
    }
    if e < 0 {
        e += n;
    }
    let count = if step > 0 {
        s = s.clamp(0, n);
        e = e.clamp(0, n);
        if e > s {
            (e - s + step - 1) / step
        } else {
            0
        }
    } else {
        s = s.clamp(-1, n - 1);
        e = e.clamp(-1, n - 1);
        if s > e {
            (s - e - step - 1) / -step
        } else {
            0
        }
    };
    (s as i64, count as usize)
}

/// True if a slice keeps every element in order, or reverses them all, whatever the size.
fn slice_is_whole(start: i64, end: i64, step: i64) -> Option<bool> {
    const BIG: i64 = i32::MAX as i64;
    if step == 1 && (start == 0 || start <= -BIG) && end >= BIG {
        Some(false)
    } else if step == -1 && (start == -1 || start >= BIG) && end <= -BIG {
        Some(true)
    } else {
        None
    }
}

fn infer_slice(x: &Fact, inputs: &[Option<&Fact>]) -> Result<Fact, String> {
    let dt = x.ty.dtype;
    let Some(d) = x.ty.shape.dims() else {
        return Ok(fact(dt, Shape::unknown()));
    };
    // Starts and ends are often shape arithmetic on a tensor with a symbolic dim elsewhere
    // (`x.shape[1] // 2`): not a constant, but its contents are known dims.
    let bound = |f: &Fact| {
        const_ints(f).or_else(|| {
            f.value_dims()?
                .iter()
                .map(|d| d.fixed().and_then(|n| i64::try_from(n).ok()))
                .collect()
        })
    };
    let starts = bound(arg(inputs, 1)?);
    let axes = match opt_arg(inputs, 3) {
        None => Some(None),
        Some(a) => const_ints(a).map(Some),
    };
    let steps = match opt_arg(inputs, 4) {
        None => Some(None),
        Some(a) => const_ints(a).map(Some),
    };
    // An end that is the sliced axis's own symbolic size (`x[:, :S]` with `S = x.shape[1]`)
    // runs to the end of that axis.
    let ends = bound(arg(inputs, 2)?).or_else(|| {
        let e = arg(inputs, 2).ok()?.value_dims()?;
        let axes: Vec<usize> = match &axes {
            Some(Some(a)) => norm_axes(a, d.len()).ok()?,
            Some(None) => (0..e.len()).collect(),
            None => return None,
        };
        e.iter()
            .zip(axes.iter().chain(std::iter::repeat(&usize::MAX)))
            .map(|(dim, &a)| match dim {
                Dim::Fixed(n) => i64::try_from(*n).ok(),
                Dim::Sym(_) if d.get(a) == Some(dim) => Some(i64::MAX),
                _ => None,
            })
            .collect()
    });
    let (Some(starts), Some(ends), Some(axes), Some(steps)) = (starts, ends, axes, steps) else {
        return Ok(fact(dt, Shape::unknown_of_rank(d.len())));
    };
    let params = slice_params(d.len(), &starts, &ends, axes, steps)?;
    let mut out = d.to_vec();
    let mut contents = if d.len() == 1 { x.value_dims() } else { None };
    for &(a, s, e, st) in &params {
        out[a] = match &d[a] {
            Dim::Fixed(n) => {
                let (first, count) = slice_range(*n as usize, s, e, st);
                if let Some(c) = contents.as_mut() {
                    if c.len() as u64 == *n {
                        *c = (0..count)
                            .map(|i| c[(first + i as i64 * st) as usize].clone())
                            .collect();
                    }
                }
                Dim::Fixed(count as u64)
            }
            other => match slice_is_whole(s, e, st) {
                Some(rev) => {
                    if rev {
                        contents = None;
                    }
                    other.clone()
                }
                None => {
                    contents = None;
                    Dim::Unknown
                }
            },
        };
    }
    Ok(fact_dims(dt, Shape::new(out), contents))
}

fn eval_slice(x: &Tensor, inputs: &[Option<&Tensor>]) -> Result<Tensor, String> {
    let starts = ints(arg(inputs, 1)?, "starts")?;
    let ends = ints(arg(inputs, 2)?, "ends")?;
    let axes = opt_arg(inputs, 3).map(|a| ints(a, "axes")).transpose()?;
    let steps = opt_arg(inputs, 4).map(|a| ints(a, "steps")).transpose()?;
    let params = slice_params(x.rank(), &starts, &ends, axes, steps)?;
    let shape = x.shape();
    let mut first: Vec<i64> = vec![0; shape.len()];
    let mut step: Vec<i64> = vec![1; shape.len()];
    let mut out = shape.to_vec();
    for &(a, s, e, st) in &params {
        let (f, c) = slice_range(shape[a], s, e, st);
        first[a] = f;
        step[a] = st;
        out[a] = c;
    }
    let strd = strides(shape);
    let mut map = Vec::with_capacity(out.iter().product());
    for_each_index(&out, |ix| {
        let mut off = 0usize;
        for k in 0..ix.len() {
            let i = first[k] + ix[k] as i64 * step[k];
            off += usize::try_from(i).map_err(|_| "slice index underflow")? * strd[k];
        }
        map.push(off);
        Ok(())
    })?;
    gathered(x, out, &map)
}

// ---- expand, pad

/// For each element of `out`, the element of a tensor of shape `src` that broadcasts to it.
pub(crate) fn broadcast_map(src: &[usize], out: &[usize]) -> Vec<usize> {
    let st = strides(src);
    let lead = out.len() - src.len();
    let bst: Vec<usize> = (0..out.len())
        .map(|k| {
            if k < lead || src[k - lead] == 1 {
                0
            } else {
                st[k - lead]
            }
        })
        .collect();
    let mut map = Vec::with_capacity(out.iter().product());
    let _ = for_each_index(out, |ix| {
        map.push(ix.iter().zip(&bst).map(|(a, b)| a * b).sum());
        Ok(())
    });
    map
}

/// Per-axis (begin, end) pad amounts from the `pads` and `axes` inputs (shared with the
/// runtime's native pad).
pub fn pad_amounts(pads: &[i64], axes: &[i64], rank: usize) -> Result<Vec<(i64, i64)>, String> {
    let axes = norm_axes(axes, rank)?;
    if pads.len() != 2 * axes.len() {
        return Err(format!("{} pads for {} axes", pads.len(), axes.len()));
    }
    let mut per = vec![(0, 0); rank];
    for (i, &a) in axes.iter().enumerate() {
        per[a] = (pads[i], pads[i + axes.len()]);
    }
    Ok(per)
}

fn eval_pad(x: &Tensor, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Tensor, String> {
    let shape = x.shape();
    let rank = x.rank();
    let pads = ints(arg(inputs, 1)?, "pads")?;
    let axes = match opt_arg(inputs, 3) {
        Some(a) => ints(a, "axes")?,
        None => (0..rank as i64).collect(),
    };
    let per = pad_amounts(&pads, &axes, rank)?;
    let fill = match opt_arg(inputs, 2) {
        Some(c) if c.len() == 1 => c.cast(x.dtype()),
        Some(c) if c.is_empty() => Tensor::zeros(x.dtype(), vec![]),
        Some(_) => return Err("constant_value must be one element".into()),
        None => Tensor::zeros(x.dtype(), vec![]),
    };
    let mode = attrs.string_or("mode", "constant".into())?;
    // Negative pads crop: the kept region of each axis, then the positive padding.
    let mut lo = vec![0usize; rank];
    let mut kept = vec![0usize; rank];
    let mut before = vec![0usize; rank];
    let mut out = vec![0usize; rank];
    for k in 0..rank {
        let (b, e) = per[k];
        let n = shape[k] as i64;
        let crop_b = (-b).max(0);
        let crop_e = (-e).max(0);
        let len = n - crop_b - crop_e;
        if len < 0 {
            return Err(format!("pads {b}, {e} crop past size {n}"));
        }
        lo[k] = crop_b as usize;
        kept[k] = len as usize;
        before[k] = b.max(0) as usize;
        out[k] = (len as usize)
            .checked_add(b.max(0) as usize)
            .and_then(|v| v.checked_add(e.max(0) as usize))
            .ok_or("padded shape overflows")?;
    }
    checked_numel(&out)?;
    if mode != "constant" {
        for k in 0..rank {
            if kept[k] == 0 && out[k] > 0 {
                return Err(format!("cannot {mode}-pad an empty axis"));
            }
        }
    }
    let st = strides(shape);
    let mut map: Vec<Option<usize>> = Vec::with_capacity(out.iter().product());
    let mut err = None;
    for_each_index(&out, |ix| {
        let mut off = Some(0usize);
        for k in 0..rank {
            let c = ix[k] as i64 - before[k] as i64;
            let n = kept[k] as i64;
            let src = if (0..n).contains(&c) {
                Some(c)
            } else {
                match mode.as_str() {
                    "constant" => None,
                    "edge" => Some(c.clamp(0, n - 1)),
                    "wrap" => Some(c.rem_euclid(n)),
                    "reflect" => {
                        if n == 1 {
                            Some(0)
                        } else {
                            let p = 2 * (n - 1);
                            let m = c.rem_euclid(p);
                            Some(if m >= n { p - m } else { m })
                        }
                    }
                    m => {
                        err = Some(format!("unknown pad mode `{m}`"));
                        None
                    }
                }
            };
            off = match (off, src) {
                (Some(o), Some(s)) => Some(o + (s as usize + lo[k]) * st[k]),
                _ => None,
            };
        }
        map.push(off);
        Ok(())
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    Tensor::new(out, take_or(x.data(), &map, fill.data())?)
}
