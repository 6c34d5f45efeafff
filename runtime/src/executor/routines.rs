//! Native fast paths for ops the partitioner leaves as fallbacks: data movement (f32
//! `transpose`, `gather`, `concat`, `expand`, and the copy-only `reshape`/`squeeze`/`unsqueeze`/
//! `flatten`/`identity`/`shape`), the fused row ops `inv_std`/`inv_rms`/`rotary` in f32 and
//! `linear_attention` (its chunked kernel in `native/linear_attention.rs`), `linear_scan`
//! (`native/linear_scan.rs`), and the op
//! families with a file of their own under `native/`: reductions and cumulative sums
//! (`reduce.rs`), softmax-likes on any axis and channel norms (`norm.rs`), slice and pad
//! (`layout.rs`), scatter_nd (`index.rs`), casts (`cast.rs`), per-tensor quantize/dequantize
//! and dynamic_quantize_linear (`quant.rs`), windowed and global pooling (`pool.rs`),
//! nearest resize (`resize.rs`); convs are prepared contractions (`conv_gemm.rs`), with
//! `conv_general.rs` for a conv that was not prepared. So glue between kernels costs a copy
//! or one pass, not the interpreter's f64 round trip and per-element index maps. Anything
//! unusual (other dtypes, bad attributes, out-of-range indices) returns `None` and runs
//! through the interpreter, which defines the semantics
//! and reports the errors (naming the node, through the executor). `lstm`/`gru`/`rnn`
//! dispatch from here to their own routine in `recurrent.rs`, under the same contract.

use super::arena::Outputs;
use crate::pool::{Pool, SharedMut};
use kiln_ir::ops::Lowering;
use kiln_ir::{Elem, Node, OpKind, Tensor};

/// Elements per block of the row statistics: summed in f32 lanes, blocks added in f64, so
/// the rounding error stays near the f64 reference's for rows of any length.
const STAT_BLOCK: usize = 64;
/// f32 lanes of the row statistics' block sums (a vector register's worth).
const STAT_LANES: usize = 8;

/// Whether ops of this kind may have a fast path (see [`run_fast`]).
pub fn has_fast_path(op: OpKind) -> bool {
    matches!(op.lowering(), Lowering::Native | Lowering::Loop)
}

/// Whether the op only renames its first input's elements under a new shape (see
/// [`movement_shape`]), so the executor may hand the buffer over when it is the last use.
pub fn is_view(op: OpKind) -> bool {
    matches!(
        op,
        OpKind::Reshape | OpKind::Squeeze | OpKind::Unsqueeze | OpKind::Flatten | OpKind::Identity
    )
}

/// The outputs of `node` computed natively, or `None` when it has no fast path here.
pub fn run_fast(node: &Node, ins: &[Option<&Tensor>]) -> Option<Vec<Tensor>> {
    run_fast_on(node, ins, &Pool::single(), &mut Outputs::none())
}

/// [`run_fast`] with the large data movements (`transpose`) split over `pool`: at two
/// threads a GEMM leaves half its output in each core's cache, and one thread moving all of
/// it took longer than at one thread. The transposes and copies write into their planned
/// regions of `out` where they have one.
pub fn run_fast_on(
    node: &Node,
    ins: &[Option<&Tensor>],
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Vec<Tensor>> {
    let y = match node.op {
        OpKind::Transpose => return transpose(node, ins, pool, out),
        OpKind::Split => return split(node, ins, out),
        OpKind::Lstm | OpKind::Gru | OpKind::Rnn => return super::recurrent::run(node, ins, pool),
        // First-order linear recurrences, sequential or chunked (`native/linear_scan.rs`).
        OpKind::LinearScan => return crate::native::linear_scan::run(&node.attrs, ins, pool, out),
        OpKind::Gather => gather(node, ins, out)?,
        OpKind::Concat => concat(node, ins, out)?,
        OpKind::Expand => expand(ins, out)?,
        OpKind::Reshape
        | OpKind::Squeeze
        | OpKind::Unsqueeze
        | OpKind::Flatten
        | OpKind::Identity => {
            let x = (*ins.first()?)?;
            let shape = movement_shape(node, ins)?;
            // The same elements under a new shape: one memcpy, no index map.
            match (x.as_slice::<f32>(), out.region::<f32>(0, x.len())) {
                (Some(src), Some(mut r)) if shape.iter().product::<usize>() == x.len() => {
                    r.copy_from_slice(src);
                    Tensor::from_buf(shape, r)
                }
                _ => x.clone().reshaped(shape).ok()?,
            }
        }
        OpKind::Shape => shape_of(node, ins)?,
        OpKind::InvStd => row_stat(ins, true, pool)?,
        OpKind::InvRms => row_stat(ins, false, pool)?,
        OpKind::Rotary => rotary(node, ins)?,
        OpKind::Where => where_(ins, out)?,
        // Integer index arithmetic (position ids, shape math that depends on values);
        // f32 add/sub/mul are loop kernels and never reach here.
        OpKind::Add => int_binary(ins, IntOp::Add, out)?,
        OpKind::Sub => int_binary(ins, IntOp::Sub, out)?,
        OpKind::Mul => int_binary(ins, IntOp::Mul, out)?,
        OpKind::And => logical(ins, |a, b| a & b)?,
        OpKind::Or => logical(ins, |a, b| a | b)?,
        OpKind::Xor => logical(ins, |a, b| a ^ b)?,
        OpKind::Equal
        | OpKind::Less
        | OpKind::LessOrEqual
        | OpKind::Greater
        | OpKind::GreaterOrEqual => compare(node.op, ins, out)?,
        OpKind::Not => {
            let x = (*ins.first()?)?;
            let v: Vec<bool> = x.as_slice::<bool>()?.iter().map(|b| !b).collect();
            into_region(out, x.shape().to_vec(), v)
        }
        OpKind::IsNaN | OpKind::IsInf | OpKind::Shrink | OpKind::ThresholdedRelu => {
            unary_select(node, ins, out)?
        }
        // Selection (`native/index.rs`, `native/reduce.rs`).
        OpKind::TopK => return crate::native::index::top_k(node, ins),
        OpKind::ArgMax | OpKind::ArgMin => crate::native::reduce::arg(node, ins)?,
        OpKind::Pow => pow(ins)?,
        OpKind::Sin => unary_f64(ins, f64::sin)?,
        OpKind::Cos => unary_f64(ins, f64::cos)?,
        // Linear attention and retention, chunked (`native/linear_attention.rs`).
        OpKind::LinearAttention => {
            crate::native::linear_attention::run(&node.attrs, ins, pool, out)?
        }
        OpKind::Cast => {
            cast_to_f32(node, ins, out).or_else(|| crate::native::cast::run(node, ins))?
        }
        OpKind::CumSum | OpKind::CumProd => crate::native::reduce::cumulative(node, ins)?,
        // The reduce family along any axes (`native/reduce.rs`).
        OpKind::ReduceSum
        | OpKind::ReduceMean
        | OpKind::ReduceMax
        | OpKind::ReduceMin
        | OpKind::ReduceProd
        | OpKind::ReduceL1
        | OpKind::ReduceL2
        | OpKind::ReduceLogSum
        | OpKind::ReduceLogSumExp
        | OpKind::ReduceSumSquare => crate::native::reduce::run(node, ins, pool)?,
        // Softmax-likes along any axis (a loop kernel takes the last one when it fuses) and
        // the channel norms (`native/norm.rs`).
        OpKind::Softmax
        | OpKind::LogSoftmax
        | OpKind::Hardmax
        | OpKind::InstanceNorm
        | OpKind::GroupNorm
        | OpKind::BatchNorm => return crate::native::norm::run(node, ins),
        // Strided copies (`native/layout.rs`) and scatters (`native/index.rs`).
        OpKind::Slice | OpKind::Pad => crate::native::layout::run(node, ins)?,
        OpKind::ScatterND => crate::native::index::run(node, ins)?,
        // Max and average pools, windowed and global (`native/pool.rs`).
        OpKind::MaxPool
        | OpKind::AveragePool
        | OpKind::GlobalMaxPool
        | OpKind::GlobalAveragePool => crate::native::pool::run(node, ins, pool, out)?,
        // Nearest-neighbour resize (`native/resize.rs`); the other modes decline.
        OpKind::Resize => crate::native::resize::run(node, ins, pool, out)?,
        OpKind::QuantizeLinear | OpKind::DequantizeLinear => crate::native::quant::run(node, ins)?,
        OpKind::DynamicQuantizeLinear => return crate::native::quant::dynamic(ins, pool),
        _ => return None,
    };
    Some(vec![y])
}

fn transpose(
    node: &Node,
    ins: &[Option<&Tensor>],
    pool: &Pool,
    y: &mut Outputs,
) -> Option<Vec<Tensor>> {
    let x = (*ins.first()?)?;
    let src = x.as_slice::<f32>()?;
    let shape = x.shape();
    let rank = shape.len();
    let perm: Vec<usize> = match node.attrs.ints("perm").ok()? {
        Some(p) => p
            .iter()
            .map(|&a| usize::try_from(a).ok().filter(|&a| a < rank))
            .collect::<Option<_>>()?,
        None => (0..rank).rev().collect(),
    };
    if perm.len() != rank {
        return None;
    }
    let mut seen = vec![false; rank];
    for &p in &perm {
        if std::mem::replace(&mut seen[p], true) {
            return None;
        }
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let total = src.len();
    if total == 0 || rank == 0 {
        return Some(vec![Tensor::from_vec(out_shape, src.to_vec())]);
    }
    let plan = crate::native::permute::Permute::new(shape, &perm);
    let units = plan.units();
    // Into the planned region, or fresh memory left uninitialised: every output value is
    // written below (by exactly one range of units).
    let fill = |out: &mut [std::mem::MaybeUninit<f32>]| -> Result<(), std::convert::Infallible> {
        let dst = SharedMut::new(out.as_mut_ptr().cast());
        // SAFETY: `out` holds `total` values; each range of units is written by one task.
        let run = |lo: usize, hi: usize| unsafe { plan.run(src, dst.get(), lo, hi) };
        if total >= PAR_MIN_MOVE && pool.threads() > 1 && units > 1 {
            pool.parallel_ranges(units, |r| run(r.start, r.end));
        } else {
            run(0, units);
        }
        Ok(())
    };
    // SAFETY: the ranges above cover every unit, so every output value.
    let Ok(out) = unsafe { y.write_f32(0, total, fill) };
    Some(vec![Tensor::from_buf(out_shape, out)])
}

/// Elements from which a transpose or a row statistic is split over the pool.
const PAR_MIN_MOVE: usize = 1 << 15;

/// An integer tensor's values (i64 or i32), as the shape-like inputs carry them.
fn int_values(t: &Tensor) -> Option<Vec<i64>> {
    if let Some(v) = t.as_slice::<i64>() {
        return Some(v.to_vec());
    }
    t.as_slice::<i32>()
        .map(|v| v.iter().map(|&x| i64::from(x)).collect())
}

/// `a` normalised against `rank` (negative counts from the end), if in range.
fn norm_axis(a: i64, rank: usize) -> Option<usize> {
    let r = i64::try_from(rank).ok()?;
    let n = if a < 0 { a + r } else { a };
    (0..r).contains(&n).then_some(n as usize)
}

/// Distinct normalised axes, or `None` (the interpreter reports the error).
fn norm_axes(axes: &[i64], rank: usize) -> Option<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = norm_axis(a, rank)?;
        if out.contains(&n) {
            return None;
        }
        out.push(n);
    }
    Some(out)
}

/// The output shape of the copy-only movement ops, following the interpreter's rules
/// (`ir/src/ops/layout.rs`).
pub(crate) fn movement_shape(node: &Node, ins: &[Option<&Tensor>]) -> Option<Vec<usize>> {
    let x = (*ins.first()?)?;
    let shape = x.shape();
    let rank = shape.len();
    match node.op {
        OpKind::Identity => Some(shape.to_vec()),
        OpKind::Reshape => {
            let target = int_values((*ins.get(1)?)?)?;
            let allowzero = node.attrs.int_or("allowzero", 0).ok()? != 0;
            let mut out = Vec::with_capacity(target.len());
            let mut infer_at = None;
            for (i, &t) in target.iter().enumerate() {
                out.push(match t {
                    -1 => {
                        if infer_at.replace(i).is_some() {
                            return None;
                        }
                        1
                    }
                    0 if !allowzero => *shape.get(i)?,
                    t => usize::try_from(t).ok()?,
                });
            }
            if allowzero && infer_at.is_some() && target.contains(&0) {
                return None;
            }
            let total = x.len();
            let known = out.iter().try_fold(1usize, |a, &b| a.checked_mul(b))?;
            if let Some(i) = infer_at {
                if known == 0 || total % known != 0 {
                    return None;
                }
                out[i] = total / known;
            } else if known != total {
                return None;
            }
            Some(out)
        }
        OpKind::Flatten => {
            let a = node.attrs.int_or("axis", 1).ok()?;
            let r = i64::try_from(rank).ok()?;
            let a = if a < 0 { a + r } else { a };
            if !(0..=r).contains(&a) {
                return None;
            }
            let a = a as usize;
            Some(vec![
                shape[..a].iter().product(),
                shape[a..].iter().product(),
            ])
        }
        OpKind::Squeeze => match ins.get(1).copied().flatten() {
            None => Some(shape.iter().copied().filter(|&d| d != 1).collect()),
            Some(a) => {
                let axes = norm_axes(&int_values(a)?, rank)?;
                if axes.iter().any(|&a| shape[a] != 1) {
                    return None;
                }
                Some(
                    (0..rank)
                        .filter(|i| !axes.contains(i))
                        .map(|i| shape[i])
                        .collect(),
                )
            }
        },
        OpKind::Unsqueeze => {
            let axes = int_values((*ins.get(1)?)?)?;
            let out_rank = rank + axes.len();
            let axes = norm_axes(&axes, out_rank)?;
            let mut src = shape.iter();
            (0..out_rank)
                .map(|i| {
                    if axes.contains(&i) {
                        Some(1)
                    } else {
                        src.next().copied()
                    }
                })
                .collect()
        }
        _ => None,
    }
}

/// `shape(x)` with the optional `start`/`end` attributes (clamped, as ONNX says).
fn shape_of(node: &Node, ins: &[Option<&Tensor>]) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let r = i64::try_from(x.rank()).ok()?;
    let clamp = |v: i64| (if v < 0 { v.saturating_add(r) } else { v }).clamp(0, r) as usize;
    let s = clamp(node.attrs.int_or("start", 0).ok()?);
    let e = clamp(node.attrs.int_or("end", r).ok()?).max(s);
    let v: Vec<i64> = x.shape()[s..e].iter().map(|&d| d as i64).collect();
    Some(Tensor::from_vec(vec![v.len()], v))
}

/// `gather` along any axis for f32/i64/i32/bool data: whole inner blocks copied per index
/// (the embedding lookup is one row memcpy per token). Indices are normalised per ONNX
/// (negative counts from the end); an out-of-range one returns `None`, so the interpreter
/// reports it against the node.
fn gather(node: &Node, ins: &[Option<&Tensor>], y: &mut Outputs) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let ind = (*ins.get(1)?)?;
    let shape = x.shape();
    let a = norm_axis(node.attrs.int_or("axis", 0).ok()?, shape.len())?;
    let n = shape[a];
    let ni = i64::try_from(n).ok()?;
    let wrap = |i: i64| {
        let j = if i < 0 { i + ni } else { i };
        (0..ni).contains(&j).then_some(j as usize)
    };
    // (A loop body gathers one step's slice per iteration: no allocation for a few indices.)
    let idx: smallvec::SmallVec<[usize; 4]> = match ind.as_slice::<i64>() {
        Some(v) => v.iter().map(|&i| wrap(i)).collect::<Option<_>>()?,
        None => int_values(ind)?
            .into_iter()
            .map(wrap)
            .collect::<Option<_>>()?,
    };
    let outer: usize = shape[..a].iter().product();
    let inner: usize = shape[a + 1..].iter().product();
    let mut out = Vec::with_capacity(shape.len() - 1 + ind.rank());
    out.extend_from_slice(&shape[..a]);
    out.extend_from_slice(ind.shape());
    out.extend_from_slice(&shape[a + 1..]);
    fn go<T: Elem>(
        x: &Tensor,
        idx: &[usize],
        (outer, n, inner): (usize, usize, usize),
        out: &[usize],
        y: &mut Outputs,
    ) -> Option<Tensor> {
        let src = x.as_slice::<T>()?;
        let total = outer.checked_mul(idx.len())?.checked_mul(inner)?;
        Some(copy_blocks(y, out.to_vec(), total, |push| {
            for o in 0..outer {
                for &i in idx {
                    let base = (o * n + i) * inner;
                    push(&src[base..base + inner]);
                }
            }
        }))
    }
    let dims = (outer, n, inner);
    go::<f32>(x, &idx, dims, &out, y)
        .or_else(|| go::<i64>(x, &idx, dims, &out, y))
        .or_else(|| go::<i32>(x, &idx, dims, &out, y))
        .or_else(|| go::<bool>(x, &idx, dims, &out, y))
}

/// `concat` along `axis`: for each index of the axes before it, every input's block in
/// turn. Inputs that do not concat go to the interpreter (which reports why).
fn concat(node: &Node, ins: &[Option<&Tensor>], y: &mut Outputs) -> Option<Tensor> {
    let xs: Vec<&Tensor> = ins.iter().copied().collect::<Option<_>>()?;
    let first = *xs.first()?;
    let rank = first.rank();
    let a = norm_axis(node.attrs.int("axis").ok()??, rank)?;
    let fits = |x: &Tensor| {
        x.dtype() == first.dtype()
            && x.rank() == rank
            && (0..rank).all(|d| d == a || x.shape()[d] == first.shape()[d])
    };
    if !xs.iter().all(|x| fits(x)) {
        return None;
    }
    let mut shape = first.shape().to_vec();
    shape[a] = xs.iter().map(|x| x.shape()[a]).sum();
    let outer: usize = shape[..a].iter().product();
    let inner: usize = shape[a + 1..].iter().product();
    fn go<T: Elem>(
        xs: &[&Tensor],
        a: usize,
        (outer, inner): (usize, usize),
        shape: &[usize],
        y: &mut Outputs,
    ) -> Option<Tensor> {
        let srcs: Vec<(&[T], usize)> = xs
            .iter()
            .map(|x| Some((x.as_slice::<T>()?, x.shape()[a] * inner)))
            .collect::<Option<_>>()?;
        let total = shape.iter().product();
        Some(copy_blocks(y, shape.to_vec(), total, |push| {
            for o in 0..outer {
                for &(src, len) in &srcs {
                    push(&src[o * len..(o + 1) * len]);
                }
            }
        }))
    }
    let dims = (outer, inner);
    go::<f32>(&xs, a, dims, &shape, y)
        .or_else(|| go::<i64>(&xs, a, dims, &shape, y))
        .or_else(|| go::<i32>(&xs, a, dims, &shape, y))
        .or_else(|| go::<bool>(&xs, a, dims, &shape, y))
}

/// A tensor of `shape` made of the blocks `blocks` pushes, in order (`total` elements in
/// all): written into output 0's region of `y` where it has one, else into a new vector.
fn copy_blocks<T: Elem>(
    y: &mut Outputs,
    shape: Vec<usize>,
    total: usize,
    blocks: impl FnOnce(&mut dyn FnMut(&[T])),
) -> Tensor {
    match y.region::<T>(0, total) {
        Some(mut r) => {
            let mut at = 0;
            blocks(&mut |b: &[T]| {
                r[at..at + b.len()].copy_from_slice(b);
                at += b.len();
            });
            debug_assert_eq!(at, total, "the blocks fill the output");
            Tensor::from_buf(shape, r)
        }
        None => {
            let mut v = Vec::with_capacity(total);
            blocks(&mut |b: &[T]| v.extend_from_slice(b));
            Tensor::from_vec(shape, v)
        }
    }
}

/// Strides of `shape` read at the broadcast shape `out` (right-aligned; 0 on a broadcast
/// axis), or `None` when `shape` does not broadcast to `out`.
fn bcast_strides(shape: &[usize], out: &[usize]) -> Option<Vec<usize>> {
    let lead = out.len().checked_sub(shape.len())?;
    let st = kiln_ir::tensor::strides(shape);
    let mut s = vec![0; out.len()];
    for (i, (&d, &o)) in shape.iter().zip(&out[lead..]).enumerate() {
        if d == o {
            s[lead + i] = if d == 1 { 0 } else { st[i] };
        } else if d != 1 {
            return None;
        }
    }
    Some(s)
}

/// Visits every row (last axis) of `out` in order, passing each input's offset of the row's
/// first element. `strides` are the inputs' [`bcast_strides`].
fn for_each_row(out: &[usize], strides: &[&[usize]], mut f: impl FnMut(&[usize])) {
    let Some((_, lead)) = out.split_last() else {
        f(&vec![0; strides.len()]);
        return;
    };
    if out.contains(&0) {
        return;
    }
    let rows: usize = lead.iter().product();
    let mut idx = vec![0usize; lead.len()];
    let mut off = vec![0usize; strides.len()];
    for _ in 0..rows {
        f(&off);
        for d in (0..lead.len()).rev() {
            idx[d] += 1;
            for (o, s) in off.iter_mut().zip(strides) {
                *o += s[d];
            }
            if idx[d] < lead[d] {
                break;
            }
            for (o, s) in off.iter_mut().zip(strides) {
                *o -= s[d] * lead[d];
            }
            idx[d] = 0;
        }
    }
}

/// `expand(x, shape)`: numpy broadcasting of x against the target, rows copied or filled.
/// `v` as output 0 of the node: copied into its planned arena region where it has one (so
/// the run's footprint stays what the planner laid out), else the vector itself.
fn into_region<T: Elem>(out: &mut Outputs, shape: Vec<usize>, v: Vec<T>) -> Tensor {
    match out.region::<T>(0, v.len()) {
        Some(mut r) if !v.is_empty() => {
            r.copy_from_slice(&v);
            Tensor::from_buf(shape, r)
        }
        _ => Tensor::from_vec(shape, v),
    }
}

fn expand(ins: &[Option<&Tensor>], y: &mut Outputs) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let target: Vec<usize> = int_values((*ins.get(1)?)?)?
        .into_iter()
        .map(|d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let out = kiln_ir::shape::broadcast_concrete(x.shape(), &target)?;
    let st = bcast_strides(x.shape(), &out)?;
    fn go<T: Elem>(x: &Tensor, out: &[usize], st: &[usize], y: &mut Outputs) -> Option<Tensor> {
        let src = x.as_slice::<T>()?;
        let n = out.iter().try_fold(1usize, |a, &b| a.checked_mul(b))?;
        // Over the memory limit: the interpreter's expand reports it.
        if !kiln_ir::limits::fits(n.checked_mul(std::mem::size_of::<T>())?) {
            return None;
        }
        let inner = out.last().copied().unwrap_or(1);
        let step = st.last().copied().unwrap_or(0);
        let mut v = Vec::with_capacity(n);
        for_each_row(out, &[st], |off| {
            let o = off[0];
            if step == 0 {
                v.extend(std::iter::repeat_n(src[o], inner));
            } else {
                v.extend_from_slice(&src[o..o + inner]);
            }
        });
        Some(into_region(y, out.to_vec(), v))
    }
    go::<f32>(x, &out, &st, y)
        .or_else(|| go::<i64>(x, &out, &st, y))
        .or_else(|| go::<bool>(x, &out, &st, y))
}

/// `split` along an axis into sizes from the `split` input, or `num_outputs` chunks of
/// `ceil(n / k)` with the last one smaller: contiguous blocks copied per outer index.
fn split(node: &Node, ins: &[Option<&Tensor>], out: &mut Outputs) -> Option<Vec<Tensor>> {
    let x = (*ins.first()?)?;
    let shape = x.shape();
    let a = norm_axis(node.attrs.int_or("axis", 0).ok()?, shape.len())?;
    let n = shape[a];
    let sizes: Vec<usize> = match ins.get(1).copied().flatten() {
        Some(s) => int_values(s)?
            .into_iter()
            .map(|v| usize::try_from(v).ok())
            .collect::<Option<_>>()?,
        None => {
            let k = usize::try_from(node.attrs.int("num_outputs").ok()??).ok()?;
            if k == 0 {
                return None;
            }
            let c = n.div_ceil(k);
            let rest = n.checked_sub(c * (k - 1))?;
            let mut v = vec![c; k - 1];
            v.push(rest);
            v
        }
    };
    if sizes.iter().try_fold(0usize, |s, &b| s.checked_add(b)) != Some(n) {
        return None;
    }
    let outer: usize = shape[..a].iter().product();
    let inner: usize = shape[a + 1..].iter().product();
    // Each part goes into its planned arena region where it has one (else a new buffer).
    fn go<T: Elem>(
        x: &Tensor,
        sizes: &[usize],
        a: usize,
        (outer, n, inner): (usize, usize, usize),
        out: &mut Outputs,
    ) -> Option<Vec<Tensor>> {
        let src = x.as_slice::<T>()?;
        let mut start = 0;
        let mut outs = Vec::with_capacity(sizes.len());
        for (k, &len) in sizes.iter().enumerate() {
            let mut sh = x.shape().to_vec();
            sh[a] = len;
            let rows = (0..outer).map(|o| {
                let base = (o * n + start) * inner;
                &src[base..base + len * inner]
            });
            let region = match len * inner {
                0 => None,
                part => out.region::<T>(k, outer * part).map(|r| (r, part)),
            };
            match region {
                Some((mut r, part)) => {
                    for (dst, row) in r.chunks_exact_mut(part).zip(rows) {
                        dst.copy_from_slice(row);
                    }
                    outs.push(Tensor::from_buf(sh, r));
                }
                None => {
                    let mut v = Vec::with_capacity(outer * len * inner);
                    rows.for_each(|row| v.extend_from_slice(row));
                    outs.push(Tensor::from_vec(sh, v));
                }
            }
            start += len;
        }
        Some(outs)
    }
    let dims = (outer, n, inner);
    if x.as_slice::<f32>().is_some() {
        go::<f32>(x, &sizes, a, dims, out)
    } else if x.as_slice::<i64>().is_some() {
        go::<i64>(x, &sizes, a, dims, out)
    } else {
        go::<bool>(x, &sizes, a, dims, out)
    }
}

/// An f32 unary op evaluated in f64 and rounded once, exactly as the reference does, but
/// in one pass without the f64 copies.
/// `cast` of i32, i8 or u8 to f32 (the integer GEMM's output on its way to its scale):
/// each value rounds once to the nearest f32, as the interpreter's exact f64 step then
/// f32 does.
fn cast_to_f32(node: &Node, ins: &[Option<&Tensor>], y: &mut Outputs) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let to = match node.attrs.get("to")? {
        kiln_ir::Attr::Int(code) => kiln_ir::DType::from_onnx_code(*code as i32)?,
        kiln_ir::Attr::Str(s) => s.parse().ok()?,
        _ => return None,
    };
    if to != kiln_ir::DType::F32 {
        return None;
    }
    fn go<T: Elem>(x: &Tensor, y: &mut Outputs, f: impl Fn(T) -> f32) -> Option<Tensor> {
        let src = x.as_slice::<T>()?;
        let mut r = y
            .region::<f32>(0, src.len())
            .unwrap_or_else(|| vec![0.0f32; src.len()].into());
        for (d, &v) in r.iter_mut().zip(src) {
            *d = f(v);
        }
        Some(Tensor::from_buf(x.shape().to_vec(), r))
    }
    match x.dtype() {
        kiln_ir::DType::I32 => go::<i32>(x, y, |v| v as f32),
        kiln_ir::DType::I8 => go::<i8>(x, y, f32::from),
        kiln_ir::DType::U8 => go::<u8>(x, y, f32::from),
        _ => None,
    }
}

fn unary_f64(ins: &[Option<&Tensor>], f: fn(f64) -> f64) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let v: Vec<f32> = x
        .as_slice::<f32>()?
        .iter()
        .map(|&a| f(f64::from(a)) as f32)
        .collect();
    Some(Tensor::from_vec(x.shape().to_vec(), v))
}

/// `where(c, a, b)` with a bool condition and numpy broadcasting of all three.
fn where_(ins: &[Option<&Tensor>], y: &mut Outputs) -> Option<Tensor> {
    let (c, a, b) = ((*ins.first()?)?, (*ins.get(1)?)?, (*ins.get(2)?)?);
    let cv = c.as_slice::<bool>()?;
    let out = kiln_ir::shape::broadcast_concrete(c.shape(), a.shape())?;
    let out = kiln_ir::shape::broadcast_concrete(&out, b.shape())?;
    let st = [
        bcast_strides(c.shape(), &out)?,
        bcast_strides(a.shape(), &out)?,
        bcast_strides(b.shape(), &out)?,
    ];
    fn go<T: Elem>(
        cv: &[bool],
        a: &Tensor,
        b: &Tensor,
        out: &[usize],
        st: &[Vec<usize>; 3],
        y: &mut Outputs,
    ) -> Option<Tensor> {
        let (av, bv) = (a.as_slice::<T>()?, b.as_slice::<T>()?);
        let n = out.iter().try_fold(1usize, |x, &y| x.checked_mul(y))?;
        let inner = out.last().copied().unwrap_or(1);
        let s: [usize; 3] = std::array::from_fn(|i| st[i].last().copied().unwrap_or(0));
        let mut v = Vec::with_capacity(n);
        for_each_row(out, &[&st[0], &st[1], &st[2]], |off| {
            v.extend((0..inner).map(|j| {
                if cv[off[0] + j * s[0]] {
                    av[off[1] + j * s[1]]
                } else {
                    bv[off[2] + j * s[2]]
                }
            }));
        });
        Some(into_region(y, out.to_vec(), v))
    }
    go::<f32>(cv, a, b, &out, &st, y)
        .or_else(|| go::<i64>(cv, a, b, &out, &st, y))
        .or_else(|| go::<bool>(cv, a, b, &out, &st, y))
}

/// A bool binary op with numpy broadcasting (generic rather than a `fn` pointer, so that the
/// op inlines into the loop: a call per element took 2 ns, 36 µs of llama's causal mask).
/// The integer binary ops with a native routine.
#[derive(Clone, Copy)]
enum IntOp {
    Add,
    Sub,
    Mul,
}

/// An integer that [`int_binary`] computes on, wrapping as the reference does.
trait WrappingInt: Elem + Copy {
    fn apply(op: IntOp, a: Self, b: Self) -> Self;
}

macro_rules! wrapping_int {
    ($($t:ty),*) => {$(
        impl WrappingInt for $t {
            #[inline(always)]
            fn apply(op: IntOp, a: $t, b: $t) -> $t {
                match op {
                    IntOp::Add => a.wrapping_add(b),
                    IntOp::Sub => a.wrapping_sub(b),
                    IntOp::Mul => a.wrapping_mul(b),
                }
            }
        }
    )*};
}
wrapping_int!(i64, i32);

/// `add`/`sub`/`mul` of two i64 or two i32 tensors with numpy broadcasting, wrapping on
/// overflow as the interpreter does; `None` for other dtypes.
fn int_binary(ins: &[Option<&Tensor>], op: IntOp, y: &mut Outputs) -> Option<Tensor> {
    let (a, b) = ((*ins.first()?)?, (*ins.get(1)?)?);
    fn go<T: WrappingInt>(a: &Tensor, b: &Tensor, op: IntOp, y: &mut Outputs) -> Option<Tensor> {
        let (out, v) = broadcast_map(a, b, |x: T, z: T| T::apply(op, x, z))?;
        Some(into_region(y, out, v))
    }
    go::<i64>(a, b, op, y).or_else(|| go::<i32>(a, b, op, y))
}

fn logical(ins: &[Option<&Tensor>], f: impl Fn(bool, bool) -> bool) -> Option<Tensor> {
    let (a, b) = ((*ins.first()?)?, (*ins.get(1)?)?);
    let (out, v) = broadcast_map(a, b, f)?;
    Some(Tensor::from_vec(out, v))
}

/// A comparison of two f32, i64, i32 or bool tensors with numpy broadcasting, as the
/// interpreter compares (IEEE: every comparison with a NaN is false).
fn compare(op: OpKind, ins: &[Option<&Tensor>], y: &mut Outputs) -> Option<Tensor> {
    let (a, b) = ((*ins.first()?)?, (*ins.get(1)?)?);
    fn go<T: Elem + Copy + PartialOrd>(
        op: OpKind,
        a: &Tensor,
        b: &Tensor,
        y: &mut Outputs,
    ) -> Option<Tensor> {
        let (out, v) = match op {
            OpKind::Equal => broadcast_map(a, b, |x: T, z: T| x == z)?,
            OpKind::Less => broadcast_map(a, b, |x: T, z: T| x < z)?,
            OpKind::LessOrEqual => broadcast_map(a, b, |x: T, z: T| x <= z)?,
            OpKind::Greater => broadcast_map(a, b, |x: T, z: T| x > z)?,
            OpKind::GreaterOrEqual => broadcast_map(a, b, |x: T, z: T| x >= z)?,
            _ => return None,
        };
        Some(into_region(y, out, v))
    }
    go::<f32>(op, a, b, y)
        .or_else(|| go::<i64>(op, a, b, y))
        .or_else(|| go::<i32>(op, a, b, y))
        .or_else(|| go::<bool>(op, a, b, y))
}

/// The f32 elementwise ops that select rather than compute (`is_nan`, `is_inf` to bool;
/// `shrink`, `thresholded_relu` to f32), with the interpreter's comparisons. `shrink`'s
/// `x ± bias` is one f32 addition, which rounds as the interpreter's f64 one does.
fn unary_select(node: &Node, ins: &[Option<&Tensor>], y: &mut Outputs) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let v = x.as_slice::<f32>()?;
    let shape = x.shape().to_vec();
    let f = |name: &str, d: f32| node.attrs.float_or(name, d).ok();
    Some(match node.op {
        OpKind::IsNaN => into_region(y, shape, v.iter().map(|a| a.is_nan()).collect()),
        OpKind::IsInf => {
            let neg = node.attrs.int_or("detect_negative", 1).ok()? != 0;
            let pos = node.attrs.int_or("detect_positive", 1).ok()? != 0;
            let t = |a: &f32| a.is_infinite() && ((*a > 0.0 && pos) || (*a < 0.0 && neg));
            into_region(y, shape, v.iter().map(t).collect())
        }
        OpKind::Shrink => {
            let (bias, l) = (f("bias", 0.0)?, f("lambd", 0.5)?);
            let s = |&a: &f32| {
                if a < -l {
                    a + bias
                } else if a > l {
                    a - bias
                } else {
                    0.0
                }
            };
            into_region(y, shape, v.iter().map(s).collect())
        }
        OpKind::ThresholdedRelu => {
            let al = f("alpha", 1.0)?;
            into_region(
                y,
                shape,
                v.iter().map(|&a| if a > al { a } else { 0.0 }).collect(),
            )
        }
        _ => return None,
    })
}

/// `f` over two tensors of element type `T` with numpy broadcasting: the output shape and
/// its elements in row-major order (`None` for another dtype or shapes that do not
/// broadcast). `f` is generic, not a `fn` pointer, so it inlines into the row loop.
fn broadcast_map<T: Elem + Copy, R>(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(T, T) -> R,
) -> Option<(Vec<usize>, Vec<R>)> {
    let (av, bv) = (a.as_slice::<T>()?, b.as_slice::<T>()?);
    let out = kiln_ir::shape::broadcast_concrete(a.shape(), b.shape())?;
    let (sa, sb) = (
        bcast_strides(a.shape(), &out)?,
        bcast_strides(b.shape(), &out)?,
    );
    let n = out.iter().try_fold(1usize, |x, &y| x.checked_mul(y))?;
    let inner = out.last().copied().unwrap_or(1);
    let (ia, ib) = (
        sa.last().copied().unwrap_or(0),
        sb.last().copied().unwrap_or(0),
    );
    let mut v = Vec::with_capacity(n);
    for_each_row(&out, &[&sa, &sb], |off| {
        v.extend((0..inner).map(|j| f(av[off[0] + j * ia], bv[off[1] + j * ib])));
    });
    Some((out, v))
}

/// `pow(x, e)` for f32 x and a single-element f32 exponent of 2 (`x·x`) or 0.5
/// (`sqrt`); both round exactly as the f64 reference does (a product and a square root
/// are correctly rounded, and f64 leaves room for no double-rounding error).
fn pow(ins: &[Option<&Tensor>]) -> Option<Tensor> {
    let (x, e) = ((*ins.first()?)?, (*ins.get(1)?)?);
    let xv = x.as_slice::<f32>()?;
    let [ev] = e.as_slice::<f32>()? else {
        return None;
    };
    // The exponent must not widen x's shape.
    if e.rank() > x.rank() {
        return None;
    }
    let v: Vec<f32> = if *ev == 2.0 {
        xv.iter().map(|&a| a * a).collect()
    } else if *ev == 0.5 {
        xv.iter().map(|&a| a.sqrt()).collect()
    } else {
        return None;
    };
    Some(Tensor::from_vec(x.shape().to_vec(), v))
}

/// Sum of `f(x)` over `row` in f32 lanes per [`STAT_BLOCK`], blocks accumulated in f64.
#[inline]
fn block_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in row.chunks(STAT_BLOCK) {
        let mut acc = [0f32; STAT_LANES];
        let mut lanes = block.chunks_exact(STAT_LANES);
        for c in &mut lanes {
            for l in 0..STAT_LANES {
                acc[l] += f(c[l]);
            }
        }
        let mut s: f32 = lanes.remainder().iter().map(|&x| f(x)).sum();
        s += acc.iter().sum::<f32>();
        total += f64::from(s);
    }
    total
}

/// `inv_std` (`centred`) / `inv_rms` of f32 rows: `1/sqrt(mean((x − m)²) + eps)` per row of
/// the last axis, output `[.., 1]`. Rows are split over `pool` from [`PAR_MIN_MOVE`] elements
/// (each row's value is computed by one thread, the same way whatever the split).
fn row_stat(ins: &[Option<&Tensor>], centred: bool, pool: &Pool) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let eps = (*ins.get(1)?)?;
    if !eps.shape().is_empty() {
        return None;
    }
    let e = f64::from(*eps.as_slice::<f32>()?.first()?);
    let v = x.as_slice::<f32>()?;
    let (&k, lead) = x.shape().split_last()?;
    let mut out = lead.to_vec();
    out.push(1);
    let rows: usize = lead.iter().product();
    let n = k.max(1) as f64;
    let stat = |i: usize| {
        let row = &v[i * k..(i + 1) * k];
        let m = if centred {
            (block_sum(row, |a| a) / n) as f32
        } else {
            0.0
        };
        let var = block_sum(row, |a| (a - m) * (a - m)) / n;
        (1.0 / (var + e).sqrt()) as f32
    };
    let mut r: Vec<f32> = Vec::with_capacity(rows);
    let dst = SharedMut::new(r.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let run = |lo: usize, hi: usize| {
        for i in lo..hi {
            // SAFETY: slot `i < rows` of the reserved `rows` values, written by this range only.
            unsafe { dst.get().add(i).write(stat(i)) };
        }
    };
    if v.len() >= PAR_MIN_MOVE && pool.threads() > 1 && rows > 1 {
        pool.parallel_ranges(rows, |rg| run(rg.start, rg.end));
    } else {
        run(0, rows);
    }
    // SAFETY: the ranges above cover slots `0..rows`, each written once.
    unsafe { r.set_len(rows) };
    Some(Tensor::from_vec(out, r))
}

/// `rotary(x, cos, sin) = x·cos + rotate_half(x)·sin` in f32, for x of the output's shape
/// and cos/sin broadcasting to it with full rows (the last axis not broadcast).
fn rotary(node: &Node, ins: &[Option<&Tensor>]) -> Option<Tensor> {
    let inter = match node.attrs.int_or("interleaved", 0).ok()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let (x, cos, sin) = ((*ins.first()?)?, (*ins.get(1)?)?, (*ins.get(2)?)?);
    let (xv, cv, sv) = (
        x.as_slice::<f32>()?,
        cos.as_slice::<f32>()?,
        sin.as_slice::<f32>()?,
    );
    let shape = x.shape();
    let d = *shape.last()?;
    if d % 2 != 0 || cos.shape().last() != Some(&d) || sin.shape().last() != Some(&d) {
        return None;
    }
    let (cst, sst) = (
        bcast_strides(cos.shape(), shape)?,
        bcast_strides(sin.shape(), shape)?,
    );
    let xst = kiln_ir::tensor::strides(shape);
    let h = d / 2;
    let mut y = vec![0f32; xv.len()];
    for_each_row(shape, &[&xst, &cst, &sst], |off| {
        let (xr, c, s) = (
            &xv[off[0]..off[0] + d],
            &cv[off[1]..off[1] + d],
            &sv[off[2]..off[2] + d],
        );
        let yr = &mut y[off[0]..off[0] + d];
        if inter {
            for j in 0..h {
                let (a, b) = (xr[2 * j], xr[2 * j + 1]);
                yr[2 * j] = a * c[2 * j] - b * s[2 * j];
                yr[2 * j + 1] = b * c[2 * j + 1] + a * s[2 * j + 1];
            }
        } else {
            // Zipped slices of equal length: no bounds checks, so the loops vectorise.
            let (x0, x1) = xr.split_at(h);
            let (y0, y1) = yr.split_at_mut(h);
            let (c0, c1) = c.split_at(h);
            let (s0, s1) = s.split_at(h);
            for ((((y, &a), &b), &cj), &sj) in y0.iter_mut().zip(x0).zip(x1).zip(c0).zip(s0) {
                *y = a * cj - b * sj;
            }
            for ((((y, &b), &a), &cj), &sj) in y1.iter_mut().zip(x1).zip(x0).zip(c1).zip(s1) {
                *y = b * cj + a * sj;
            }
        }
    });
    Some(Tensor::from_vec(shape.to_vec(), y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};

    #[test]
    fn transpose_matches_the_interpreter() {
        let shapes: [&[usize]; 5] = [&[2, 3, 4, 5], &[1, 7, 3, 4], &[6], &[3, 1, 2], &[4, 0, 2]];
        for shape in shapes {
            let n: usize = shape.iter().product();
            let x = Tensor::from_vec(
                shape.to_vec(),
                (0..n).map(|i| i as f32 * 0.5 - 3.0).collect(),
            );
            let rank = shape.len() as i64;
            let perms: Vec<Option<Vec<i64>>> = match rank {
                1 => vec![None, Some(vec![0])],
                3 => vec![None, Some(vec![1, 0, 2]), Some(vec![2, 0, 1])],
                _ => vec![
                    None,
                    Some(vec![0, 2, 1, 3]),
                    Some(vec![0, 2, 3, 1]),
                    Some(vec![3, 1, 0, 2]),
                ],
            };
            for perm in perms {
                let attrs = match &perm {
                    Some(p) => Attrs::new().with("perm", Attr::Ints(p.clone())),
                    None => Attrs::new(),
                };
                let node = Node {
                    op: OpKind::Transpose,
                    attrs: attrs.clone(),
                    inputs: vec![Some(ValueId(0))],
                    outputs: vec![ValueId(1)],
                    name: String::new(),
                };
                let got = run_fast(&node, &[Some(&x)]).expect("fast path");
                let want = kiln_ir::ops::eval(OpKind::Transpose, &attrs, &[Some(&x)]).unwrap();
                assert_eq!(got[0], want[0], "shape {shape:?} perm {perm:?}");
            }
        }
    }

    #[test]
    fn large_transposes_split_over_a_pool_match_the_interpreter() {
        // Past PAR_MIN_MOVE, with row counts that do not divide evenly between threads.
        let pool = Pool::new(3).unwrap();
        for (shape, perm) in [
            (vec![2usize, 71, 6, 64], vec![0i64, 2, 1, 3]),
            (vec![3, 97, 131], vec![2, 0, 1]),
        ] {
            let n: usize = shape.iter().product();
            assert!(n >= PAR_MIN_MOVE);
            let x = Tensor::from_vec(shape.clone(), (0..n).map(|i| i as f32 * 0.25).collect());
            let attrs = Attrs::new().with("perm", Attr::Ints(perm.clone()));
            let node = Node {
                op: OpKind::Transpose,
                attrs: attrs.clone(),
                inputs: vec![Some(ValueId(0))],
                outputs: vec![ValueId(1)],
                name: String::new(),
            };
            let got =
                run_fast_on(&node, &[Some(&x)], &pool, &mut Outputs::none()).expect("fast path");
            let want = kiln_ir::ops::eval(OpKind::Transpose, &attrs, &[Some(&x)]).unwrap();
            assert_eq!(got[0], want[0], "shape {shape:?} perm {perm:?}");
        }
    }

    #[test]
    fn integer_casts_to_f32_match_the_interpreter() {
        let big = Tensor::from_vec(vec![5], vec![i32::MIN, -1, 0, 16_777_217, i32::MAX]);
        let bytes = Tensor::from_vec(vec![2], vec![-128i8, 127]);
        let ubytes = Tensor::from_vec(vec![2], vec![0u8, 255]);
        for code in [1i64, 6] {
            let attrs = Attrs::new().with("to", Attr::Int(code));
            let n = node(OpKind::Cast, attrs.clone(), 1);
            for x in [&big, &bytes, &ubytes] {
                let want = kiln_ir::ops::eval(OpKind::Cast, &attrs, &[Some(x)]).unwrap();
                match run_fast(&n, &[Some(x)]) {
                    Some(got) => assert_eq!(got[0], want[0]),
                    // Only casts to f32 (ONNX code 1) have the fast path.
                    None => assert_ne!(code, 1),
                }
            }
        }
    }

    #[test]
    fn bad_perms_and_other_dtypes_fall_back() {
        let x = Tensor::from_vec(vec![2, 3], vec![0f32; 6]);
        let i = Tensor::from_vec(vec![2, 3], vec![0i64; 6]);
        for (t, perm) in [
            (&x, vec![0, 0]),
            (&x, vec![0, 2]),
            (&x, vec![1]),
            (&i, vec![1, 0]),
        ] {
            let node = Node {
                op: OpKind::Transpose,
                attrs: Attrs::new().with("perm", Attr::Ints(perm.clone())),
                inputs: vec![Some(ValueId(0))],
                outputs: vec![ValueId(1)],
                name: String::new(),
            };
            assert!(run_fast(&node, &[Some(t)]).is_none(), "{perm:?}");
        }
    }

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// f32 row statistics against the f64 reference: relative.
    const STAT_RTOL: f64 = 1e-5;
    /// f32 rotary against the f64 reference (inputs in [-2, 2]): absolute.
    const ROTARY_ATOL: f64 = 1e-5;
    /// Random cases per property.
    const CASES: usize = 60;

    fn node(op: OpKind, attrs: Attrs, n_in: u32) -> Node {
        Node {
            op,
            attrs,
            inputs: (0..n_in).map(|i| Some(ValueId(i))).collect(),
            outputs: vec![ValueId(n_in)],
            name: "n".into(),
        }
    }

    fn rand_f32(rng: &mut StdRng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(
            shape.to_vec(),
            (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect(),
        )
    }

    /// A random shape of rank 1..=4, dims 1..=9 (so lengths not multiple of 4, and 1s).
    fn rand_shape(rng: &mut StdRng) -> Vec<usize> {
        let r = rng.gen_range(1..=4);
        (0..r).map(|_| rng.gen_range(1..=9)).collect()
    }

    /// Element-wise closeness with NaN matching only NaN and infinities matching exactly.
    fn assert_close(got: &Tensor, want: &Tensor, tol: impl Fn(f64) -> f64, what: &str) {
        assert_eq!(got.shape(), want.shape(), "{what}");
        assert_eq!(got.dtype(), want.dtype(), "{what}");
        for (i, (a, b)) in got.to_f64s().iter().zip(want.to_f64s()).enumerate() {
            let ok = if b.is_nan() {
                a.is_nan()
            } else if b.is_infinite() {
                *a == b
            } else {
                (a - b).abs() <= tol(b)
            };
            assert!(ok, "{what}: element {i}: got {a}, want {b}");
        }
    }

    fn reference(n: &Node, ins: &[Option<&Tensor>]) -> Tensor {
        kiln_ir::ops::eval(n.op, &n.attrs, ins).unwrap().remove(0)
    }

    #[test]
    fn row_statistics_match_the_interpreter_with_nan_and_inf() {
        let mut rng = StdRng::seed_from_u64(7);
        for case in 0..CASES {
            let mut shape = rand_shape(&mut rng);
            // Long rows too, across several STAT_BLOCKs.
            if case % 3 == 0 {
                *shape.last_mut().unwrap() = rng.gen_range(60..300);
            }
            let mut x = rand_f32(&mut rng, &shape);
            if case % 5 == 1 {
                let mut v = x.as_slice::<f32>().unwrap().to_vec();
                let i = rng.gen_range(0..v.len());
                v[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][case % 3];
                x = Tensor::from_vec(shape.clone(), v);
            }
            let eps = Tensor::scalar(1e-5f32);
            for op in [OpKind::InvStd, OpKind::InvRms] {
                let n = node(op, Attrs::new(), 2);
                let ins = [Some(&x), Some(&eps)];
                let got = run_fast(&n, &ins).expect("fast path").remove(0);
                let want = reference(&n, &ins);
                assert_close(
                    &got,
                    &want,
                    |b| STAT_RTOL * b.abs(),
                    &format!("{op:?} {shape:?}"),
                );
            }
        }
    }

    #[test]
    fn rotary_matches_the_interpreter_with_broadcast_caches() {
        let mut rng = StdRng::seed_from_u64(11);
        for case in 0..CASES {
            let mut shape = rand_shape(&mut rng);
            let d = 2 * rng.gen_range(1..=9);
            *shape.last_mut().unwrap() = d;
            // cos/sin: a suffix of x's shape with some axes bound to 1.
            let keep = rng.gen_range(1..=shape.len());
            let mut cs: Vec<usize> = shape[shape.len() - keep..].to_vec();
            for dim in cs.iter_mut().rev().skip(1) {
                if rng.gen_bool(0.5) {
                    *dim = 1;
                }
            }
            let x = rand_f32(&mut rng, &shape);
            let mut cos = rand_f32(&mut rng, &cs);
            let sin = rand_f32(&mut rng, &cs);
            if case % 7 == 3 {
                let mut v = cos.as_slice::<f32>().unwrap().to_vec();
                v[0] = f32::NAN;
                cos = Tensor::from_vec(cs.clone(), v);
            }
            let inter = (case % 2) as i64;
            let n = node(
                OpKind::Rotary,
                Attrs::new().with("interleaved", Attr::Int(inter)),
                3,
            );
            let ins = [Some(&x), Some(&cos), Some(&sin)];
            let got = run_fast(&n, &ins).expect("fast path").remove(0);
            let want = reference(&n, &ins);
            assert_close(&got, &want, |_| ROTARY_ATOL, &format!("{shape:?} {cs:?}"));
        }
        // A cache wider than x on a leading axis, or an odd width: the interpreter's job.
        let x = Tensor::from_vec(vec![1, 4], vec![0f32; 4]);
        let wide = Tensor::from_vec(vec![2, 4], vec![0f32; 8]);
        let n = node(OpKind::Rotary, Attrs::new(), 3);
        assert!(run_fast(&n, &[Some(&x), Some(&wide), Some(&wide)]).is_none());
        let odd = Tensor::from_vec(vec![3], vec![0f32; 3]);
        assert!(run_fast(&n, &[Some(&odd), Some(&odd), Some(&odd)]).is_none());
    }

    #[test]
    fn gather_matches_the_interpreter_and_leaves_bad_indices_to_it() {
        let mut rng = StdRng::seed_from_u64(3);
        for case in 0..CASES {
            let shape = rand_shape(&mut rng);
            let x = rand_f32(&mut rng, &shape);
            let xi = Tensor::from_vec(
                shape.clone(),
                (0..x.len() as i64).map(|i| i * 3 - 5).collect::<Vec<i64>>(),
            );
            let axis =
                rng.gen_range(0..shape.len()) as i64 - (case % 2) as i64 * shape.len() as i64;
            let n_ax = shape[axis.rem_euclid(shape.len() as i64) as usize] as i64;
            let ishape: Vec<usize> = (0..rng.gen_range(0..3))
                .map(|_| rng.gen_range(1..5))
                .collect();
            let ni: usize = ishape.iter().product();
            let ind = Tensor::from_vec(
                ishape.clone(),
                (0..ni)
                    .map(|_| rng.gen_range(-n_ax..n_ax))
                    .collect::<Vec<i64>>(),
            );
            let n = node(
                OpKind::Gather,
                Attrs::new().with("axis", Attr::Int(axis)),
                2,
            );
            for data in [&x, &xi] {
                let ins = [Some(data), Some(&ind)];
                let got = run_fast(&n, &ins).expect("fast path").remove(0);
                assert_eq!(got, reference(&n, &ins), "{shape:?} axis {axis} {ishape:?}");
            }
        }
        let x = Tensor::from_vec(vec![3, 2], vec![0f32; 6]);
        let n = node(OpKind::Gather, Attrs::new(), 2);
        for bad in [3i64, -4] {
            let ind = Tensor::from_vec(vec![1], vec![bad]);
            let ins = [Some(&x), Some(&ind)];
            assert!(run_fast(&n, &ins).is_none(), "{bad}");
            assert!(kiln_ir::ops::eval(OpKind::Gather, &n.attrs, &ins).is_err());
        }
    }

    #[test]
    fn expand_matches_the_interpreter() {
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..CASES {
            let out = rand_shape(&mut rng);
            let keep = rng.gen_range(0..=out.len());
            let xs: Vec<usize> = out[out.len() - keep..]
                .iter()
                .map(|&d| if rng.gen_bool(0.4) { 1 } else { d })
                .collect();
            let x = rand_f32(&mut rng, &xs);
            // The target may itself carry 1s where x is wider (bidirectional broadcast).
            let target: Vec<i64> = out
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    let j = i as isize - (out.len() - keep) as isize;
                    if j >= 0 && xs[j as usize] == d && rng.gen_bool(0.3) {
                        1
                    } else {
                        d as i64
                    }
                })
                .collect();
            let t = Tensor::from_vec(vec![target.len()], target.clone());
            let n = node(OpKind::Expand, Attrs::new(), 2);
            let ins = [Some(&x), Some(&t)];
            let got = run_fast(&n, &ins).expect("fast path").remove(0);
            assert_eq!(got, reference(&n, &ins), "{xs:?} -> {target:?}");
        }
    }

    #[test]
    fn integer_add_sub_mul_match_the_interpreter_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(23);
        for case in 0..CASES {
            let out = rand_shape(&mut rng);
            let (sa, sb) = (rand_bcast(&mut rng, &out), rand_bcast(&mut rng, &out));
            let op = [OpKind::Add, OpKind::Sub, OpKind::Mul][case % 3];
            let n = node(op, Attrs::new(), 2);
            // Extremes included, so wrapping on overflow is exercised.
            let pick = |rng: &mut StdRng| match rng.gen_range(0..8) {
                0 => i64::MAX,
                1 => i64::MIN,
                _ => rng.gen_range(-1000i64..1000),
            };
            let (a, b) = if case % 2 == 0 {
                let a: Vec<i64> = (0..sa.iter().product()).map(|_| pick(&mut rng)).collect();
                let b: Vec<i64> = (0..sb.iter().product()).map(|_| pick(&mut rng)).collect();
                (
                    Tensor::from_vec(sa.clone(), a),
                    Tensor::from_vec(sb.clone(), b),
                )
            } else {
                let a: Vec<i32> = (0..sa.iter().product())
                    .map(|_| pick(&mut rng) as i32)
                    .collect();
                let b: Vec<i32> = (0..sb.iter().product())
                    .map(|_| pick(&mut rng) as i32)
                    .collect();
                (
                    Tensor::from_vec(sa.clone(), a),
                    Tensor::from_vec(sb.clone(), b),
                )
            };
            let ins = [Some(&a), Some(&b)];
            let got = run_fast(&n, &ins).expect("fast path").remove(0);
            assert_eq!(got, reference(&n, &ins), "{op:?} {sa:?} {sb:?}");
        }
        // f32 is a loop kernel's business: no routine here.
        let x = Tensor::from_vec(vec![2], vec![1.0f32, 2.0]);
        assert!(run_fast(&node(OpKind::Add, Attrs::new(), 2), &[Some(&x), Some(&x)]).is_none());
    }

    /// A random shape that broadcasts to `out` (a suffix, some dims bound to 1).
    fn rand_bcast(rng: &mut StdRng, out: &[usize]) -> Vec<usize> {
        let keep = rng.gen_range(0..=out.len());
        out[out.len() - keep..]
            .iter()
            .map(|&d| if rng.gen_bool(0.4) { 1 } else { d })
            .collect()
    }

    fn rand_bool(rng: &mut StdRng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(shape.to_vec(), (0..n).map(|_| rng.gen_bool(0.5)).collect())
    }

    #[test]
    fn where_logical_and_pow_match_the_interpreter() {
        let mut rng = StdRng::seed_from_u64(13);
        for case in 0..CASES {
            let out = rand_shape(&mut rng);
            let (cs, as_, bs) = (
                rand_bcast(&mut rng, &out),
                rand_bcast(&mut rng, &out),
                rand_bcast(&mut rng, &out),
            );
            let c = rand_bool(&mut rng, &cs);
            let mut a = rand_f32(&mut rng, &as_);
            if case % 4 == 0 {
                let mut v = a.as_slice::<f32>().unwrap().to_vec();
                v[0] = f32::NAN;
                a = Tensor::from_vec(as_.clone(), v);
            }
            let b = rand_f32(&mut rng, &bs);
            let n = node(OpKind::Where, Attrs::new(), 3);
            let ins = [Some(&c), Some(&a), Some(&b)];
            let got = run_fast(&n, &ins).expect("fast path").remove(0);
            assert_close(
                &got,
                &reference(&n, &ins),
                |_| 0.0,
                &format!("where {cs:?} {as_:?} {bs:?}"),
            );
            let (ai, bi) = (
                Tensor::from_vec(as_.clone(), (0..a.len() as i64).collect::<Vec<_>>()),
                Tensor::from_vec(
                    bs.clone(),
                    (0..b.len() as i64).map(|i| -i).collect::<Vec<_>>(),
                ),
            );
            let ins = [Some(&c), Some(&ai), Some(&bi)];
            assert_eq!(
                run_fast(&n, &ins).expect("fast path")[0],
                reference(&n, &ins)
            );
            let (p, q) = (rand_bool(&mut rng, &as_), rand_bool(&mut rng, &bs));
            for op in [OpKind::And, OpKind::Or, OpKind::Xor] {
                let n = node(op, Attrs::new(), 2);
                let ins = [Some(&p), Some(&q)];
                assert_eq!(
                    run_fast(&n, &ins).expect("fast path")[0],
                    reference(&n, &ins),
                    "{op:?}"
                );
            }
            let x = rand_f32(&mut rng, &out);
            let x = Tensor::from_vec(
                out.clone(),
                x.as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v * 1e3)
                    .collect(),
            );
            for (e, fast) in [(2.0f32, true), (0.5, true), (3.0, false)] {
                let et = Tensor::scalar(e);
                let n = node(OpKind::Pow, Attrs::new(), 2);
                let ins = [Some(&x), Some(&et)];
                match run_fast(&n, &ins) {
                    Some(got) => {
                        assert!(fast, "pow {e} should fall back");
                        // Exact: NaN (sqrt of a negative) matches only NaN.
                        assert_close(&got[0], &reference(&n, &ins), |_| 0.0, &format!("pow {e}"));
                    }
                    None => assert!(!fast, "pow {e} should be native"),
                }
            }
        }
    }

    #[test]
    fn sin_and_cos_match_the_interpreter_exactly() {
        let mut rng = StdRng::seed_from_u64(19);
        let shape = [3, 7, 5];
        let mut x = rand_f32(&mut rng, &shape);
        let mut v: Vec<f32> = x
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|a| a * 400.0)
            .collect();
        v[0] = f32::NAN;
        v[1] = f32::INFINITY;
        v[2] = -0.0;
        x = Tensor::from_vec(shape.to_vec(), v);
        for op in [OpKind::Sin, OpKind::Cos] {
            let n = node(op, Attrs::new(), 1);
            let ins = [Some(&x)];
            let got = run_fast(&n, &ins).expect("fast path").remove(0);
            assert_close(&got, &reference(&n, &ins), |_| 0.0, &format!("{op:?}"));
        }
    }

    /// f32 values drawn from a small set (so ties happen), with NaN, ±Inf and ±0 among them.
    fn rand_tied(rng: &mut StdRng, shape: &[usize]) -> Tensor {
        const POOL: [f32; 9] = [
            -1.5,
            -0.5,
            -0.0,
            0.0,
            0.25,
            0.5,
            2.0,
            f32::INFINITY,
            f32::NAN,
        ];
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| match rng.gen_range(0..8) {
                0..=2 => POOL[rng.gen_range(0..POOL.len())],
                3 => f32::NEG_INFINITY,
                _ => rng.gen_range(-2.0f32..2.0),
            })
            .collect();
        Tensor::from_vec(shape.to_vec(), v)
    }

    /// Equal, or both NaN at the same places (the outputs are selections, never computed,
    /// except shrink's `x ± bias`, one correctly rounded addition either way).
    fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
        assert_close(got, want, |_| 0.0, what);
    }

    #[test]
    fn comparisons_selections_top_k_and_arg_max_match_the_interpreter_exactly() {
        let mut rng = StdRng::seed_from_u64(29);
        let mut native = 0;
        for case in 0..CASES {
            let out = rand_shape(&mut rng);
            let (as_, bs) = (rand_bcast(&mut rng, &out), rand_bcast(&mut rng, &out));
            let (a, b) = (rand_tied(&mut rng, &as_), rand_tied(&mut rng, &bs));
            let ints = |t: &Tensor| {
                let v = t.as_slice::<f32>().unwrap();
                Tensor::from_vec(
                    t.shape().to_vec(),
                    v.iter().map(|x| (x * 2.0) as i64 % 5).collect::<Vec<_>>(),
                )
            };
            let (ai, bi) = (ints(&a), ints(&b));
            for op in [
                OpKind::Equal,
                OpKind::Less,
                OpKind::LessOrEqual,
                OpKind::Greater,
                OpKind::GreaterOrEqual,
            ] {
                let n = node(op, Attrs::new(), 2);
                for ins in [[Some(&a), Some(&b)], [Some(&ai), Some(&bi)]] {
                    let got = run_fast(&n, &ins).expect("fast path").remove(0);
                    assert_eq!(got, reference(&n, &ins), "{op:?} {as_:?} {bs:?}");
                }
            }
            let p = rand_bool(&mut rng, &out);
            let n = node(OpKind::Not, Attrs::new(), 1);
            assert_eq!(
                run_fast(&n, &[Some(&p)]).unwrap()[0],
                reference(&n, &[Some(&p)])
            );
            let x = rand_tied(&mut rng, &out);
            let unary = [
                (OpKind::IsNaN, Attrs::new()),
                (
                    OpKind::IsInf,
                    Attrs::new().with("detect_positive", Attr::Int(0)),
                ),
                (OpKind::IsInf, Attrs::new()),
                (OpKind::Shrink, Attrs::new().with("lambd", Attr::Float(0.5))),
                (
                    OpKind::Shrink,
                    Attrs::new()
                        .with("lambd", Attr::Float(0.3))
                        .with("bias", Attr::Float(0.1)),
                ),
                (
                    OpKind::ThresholdedRelu,
                    Attrs::new().with("alpha", Attr::Float(0.25)),
                ),
            ];
            for (op, attrs) in unary {
                let n = node(op, attrs, 1);
                let got = run_fast(&n, &[Some(&x)]).expect("fast path").remove(0);
                assert_same(
                    &got,
                    &reference(&n, &[Some(&x)]),
                    &format!("{op:?} {out:?}"),
                );
            }
            // Selection along every axis, negative axes included.
            let rank = out.len() as i64;
            let axis = rng.gen_range(-rank..rank);
            let ax = usize::try_from(if axis < 0 { axis + rank } else { axis }).unwrap();
            for op in [OpKind::ArgMax, OpKind::ArgMin] {
                let attrs = Attrs::new()
                    .with("axis", Attr::Int(axis))
                    .with("keepdims", Attr::Int(i64::from(case % 2 == 0)))
                    .with("select_last_index", Attr::Int(i64::from(case % 3 == 0)));
                let n = node(op, attrs, 1);
                for t in [&x, &ints(&x)] {
                    let got = run_fast(&n, &[Some(t)]).expect("fast path").remove(0);
                    assert_eq!(got, reference(&n, &[Some(t)]), "{op:?} axis {axis} {out:?}");
                }
            }
            let k = rng.gen_range(0..=out[ax]);
            let attrs = Attrs::new()
                .with("axis", Attr::Int(axis))
                .with("largest", Attr::Int(i64::from(case % 2 == 1)));
            let mut n = node(OpKind::TopK, attrs, 2);
            n.outputs.push(ValueId(3));
            let kt = Tensor::from_vec(vec![1], vec![k as i64]);
            for t in [&x, &ints(&x)] {
                let ins = [Some(t), Some(&kt)];
                let got = run_fast(&n, &ins).expect("fast path");
                let want = kiln_ir::ops::eval(n.op, &n.attrs, &ins).unwrap();
                assert_same(
                    &got[0],
                    &want[0],
                    &format!("top_k values k={k} axis {axis}"),
                );
                assert_eq!(got[1], want[1], "top_k indices k={k} axis {axis} {out:?}");
                native += 1;
            }
        }
        assert_eq!(native, 2 * CASES);
        // k beyond the axis: the interpreter runs it and reports the error.
        let x = Tensor::from_vec(vec![3], vec![1.0f32, 2.0, 3.0]);
        let kt = Tensor::from_vec(vec![1], vec![4i64]);
        let n = node(OpKind::TopK, Attrs::new(), 2);
        assert!(run_fast(&n, &[Some(&x), Some(&kt)]).is_none());
    }

    #[test]
    fn concat_matches_the_interpreter() {
        let mut rng = StdRng::seed_from_u64(23);
        for case in 0..CASES {
            let shape = rand_shape(&mut rng);
            let axis = rng.gen_range(0..shape.len());
            let k = rng.gen_range(1..=4);
            let xs: Vec<Tensor> = (0..k)
                .map(|_| {
                    let mut s = shape.clone();
                    s[axis] = rng.gen_range(0..=5);
                    let t = rand_f32(&mut rng, &s);
                    // Every dtype with a fast path, not only f32.
                    match case % 3 {
                        0 => t,
                        1 => t.cast(kiln_ir::DType::I64),
                        _ => t.cast(kiln_ir::DType::Bool),
                    }
                })
                .collect();
            let ax = if case % 2 == 0 {
                axis as i64
            } else {
                axis as i64 - shape.len() as i64
            };
            let attrs = Attrs::new().with("axis", Attr::Int(ax));
            let nd = node(OpKind::Concat, attrs.clone(), k as u32);
            let ins: Vec<Option<&Tensor>> = xs.iter().map(Some).collect();
            let want = kiln_ir::ops::eval(OpKind::Concat, &attrs, &ins).expect("concats");
            let got = run_fast(&nd, &ins).expect("fast path");
            assert_eq!(got, want, "{shape:?} axis {ax}");
        }
        // Shapes that differ off the axis, and mixed dtypes: left to the interpreter.
        let a = Tensor::from_vec(vec![2, 3], vec![0f32; 6]);
        let b = Tensor::from_vec(vec![3, 3], vec![0f32; 9]);
        let c = Tensor::from_vec(vec![2, 3], vec![0i64; 6]);
        let nd = node(OpKind::Concat, Attrs::new().with("axis", Attr::Int(1)), 2);
        assert!(run_fast(&nd, &[Some(&a), Some(&b)]).is_none());
        assert!(run_fast(&nd, &[Some(&a), Some(&c)]).is_none());
    }

    #[test]
    fn split_matches_the_interpreter() {
        let mut rng = StdRng::seed_from_u64(17);
        for case in 0..CASES {
            let shape = rand_shape(&mut rng);
            let x = rand_f32(&mut rng, &shape);
            let axis = rng.gen_range(0..shape.len());
            let n = shape[axis];
            let (attrs, sizes) = if case % 2 == 0 {
                let k = rng.gen_range(1..=n);
                (
                    Attrs::new()
                        .with("axis", Attr::Int(axis as i64))
                        .with("num_outputs", Attr::Int(k as i64)),
                    None,
                )
            } else {
                let cut = rng.gen_range(0..=n);
                (
                    Attrs::new().with("axis", Attr::Int(axis as i64 - shape.len() as i64)),
                    Some(Tensor::from_vec(
                        vec![2],
                        vec![cut as i64, (n - cut) as i64],
                    )),
                )
            };
            let nd = node(
                OpKind::Split,
                attrs.clone(),
                if sizes.is_some() { 2 } else { 1 },
            );
            let ins = [Some(&x), sizes.as_ref()];
            let ins = &ins[..nd.inputs.len()];
            let want = kiln_ir::ops::eval(OpKind::Split, &attrs, ins);
            match (run_fast(&nd, ins), want) {
                (Some(got), Ok(want)) => assert_eq!(got, want, "{shape:?} {attrs:?}"),
                // ceil-sized chunks may not fit (e.g. 4 into 3): both decline.
                (None, Err(_)) => {}
                (got, want) => panic!("{shape:?} {attrs:?}: fast {got:?} vs {want:?}"),
            }
        }
        let x = Tensor::from_vec(vec![4], vec![0f32; 4]);
        let bad = Tensor::from_vec(vec![2], vec![1i64, 2]);
        let nd = node(OpKind::Split, Attrs::new(), 2);
        assert!(run_fast(&nd, &[Some(&x), Some(&bad)]).is_none());
    }

    #[test]
    fn movement_and_shape_ops_match_the_interpreter() {
        let x = Tensor::from_vec(vec![2, 1, 3, 1], (0..6).map(|i| i as f32).collect());
        let xi = Tensor::from_vec(vec![2, 1, 3, 1], (0..6i64).collect::<Vec<_>>());
        let ints = |v: Vec<i64>| Tensor::from_vec(vec![v.len()], v);
        let cases: Vec<(OpKind, Attrs, Option<Tensor>)> = vec![
            (OpKind::Reshape, Attrs::new(), Some(ints(vec![0, -1]))),
            (OpKind::Reshape, Attrs::new(), Some(ints(vec![3, 2, 1]))),
            (OpKind::Reshape, Attrs::new(), Some(ints(vec![-1]))),
            (OpKind::Squeeze, Attrs::new(), None),
            (OpKind::Squeeze, Attrs::new(), Some(ints(vec![-1, 1]))),
            (OpKind::Unsqueeze, Attrs::new(), Some(ints(vec![0, -1]))),
            (OpKind::Unsqueeze, Attrs::new(), Some(ints(vec![2]))),
            (OpKind::Flatten, Attrs::new(), None),
            (
                OpKind::Flatten,
                Attrs::new().with("axis", Attr::Int(-1)),
                None,
            ),
            (
                OpKind::Flatten,
                Attrs::new().with("axis", Attr::Int(0)),
                None,
            ),
            (OpKind::Identity, Attrs::new(), None),
            (OpKind::Shape, Attrs::new(), None),
            (
                OpKind::Shape,
                Attrs::new().with("start", Attr::Int(1)),
                None,
            ),
            (
                OpKind::Shape,
                Attrs::new()
                    .with("start", Attr::Int(-3))
                    .with("end", Attr::Int(-1)),
                None,
            ),
        ];
        for (op, attrs, second) in cases {
            for data in [&x, &xi] {
                let n = node(op, attrs.clone(), if second.is_some() { 2 } else { 1 });
                let ins = [Some(data), second.as_ref()];
                let ins = &ins[..n.inputs.len()];
                let got = run_fast(&n, ins).expect("fast path");
                assert_eq!(got[0], reference(&n, ins), "{op:?} {attrs:?} {second:?}");
            }
        }
        // Errors stay with the interpreter.
        let bad: Vec<(OpKind, Tensor)> = vec![
            (OpKind::Reshape, ints(vec![4, -1])),
            (OpKind::Reshape, ints(vec![-1, -1])),
            (OpKind::Squeeze, ints(vec![0])),
            (OpKind::Unsqueeze, ints(vec![1, 1])),
            (OpKind::Unsqueeze, ints(vec![9])),
        ];
        for (op, second) in bad {
            let n = node(op, Attrs::new(), 2);
            let ins = [Some(&x), Some(&second)];
            assert!(run_fast(&n, &ins).is_none(), "{op:?} {second:?}");
            assert!(kiln_ir::ops::eval(op, &n.attrs, &ins).is_err(), "{op:?}");
        }
    }
}
