//! The reduce family natively in f32: `reduce_sum`/`mean`/`max`/`min`/`prod`/`l1`/`l2`/
//! `log_sum`/`log_sum_exp`/`sum_square` along any set of axes. Elements are read as f32 and
//! accumulated in f64 (the interpreter's precision), without its f64 copy of the input or its
//! per-element slot map where the reduced axes are one contiguous block (`outer × r × inner`:
//! the last axis, the middle, the leading axes). Scattered axes take a slot map, still in one
//! pass. `cumsum`/`cumprod` along one axis in f32, i64 and i32 (integers wrap, as in the
//! interpreter). `arg_max`/`arg_min` along one axis in f32, i64 and i32 (the interpreter's
//! scan: the first best, or the last with `select_last_index`; a NaN is never better than the
//! kept element). Global pooling lives with the other pools (`pool.rs`). Other dtypes, bad
//! axes or `noop_with_empty_axes` corner cases return `None` (the interpreter's op runs and
//! reports errors).

use crate::pool::Pool;
use kiln_ir::{Node, OpKind, Tensor};
use std::sync::Mutex;

/// Inputs with fewer elements than this reduce on one thread.
const PAR_MIN_ELEMS: usize = 1 << 18;

/// The outputs of a reduce node on f32 input, or `None` where the interpreter runs it.
/// Contiguous reductions of large inputs split their outer blocks over `pool`.
pub fn run(node: &Node, ins: &[Option<&Tensor>], pool: &Pool) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let v = x.as_slice::<f32>()?;
    let shape = x.shape();
    let rank = shape.len();
    let keep = node.attrs.int_or("keepdims", 1).ok()? != 0;
    let noop = node.attrs.int_or("noop_with_empty_axes", 0).ok()? != 0;
    let given: Vec<i64> = match ins.get(1).copied().flatten() {
        Some(a) => a.as_slice::<i64>()?.to_vec(),
        None => vec![],
    };
    if given.is_empty() && noop {
        return Some(x.clone());
    }
    let mut axes = Vec::with_capacity(given.len());
    for &a in &given {
        let n = if a < 0 { a + rank as i64 } else { a };
        axes.push(usize::try_from(n).ok().filter(|&n| n < rank)?);
    }
    if axes.is_empty() {
        axes = (0..rank).collect();
    }
    axes.sort_unstable();
    axes.dedup();
    let op = Red::of(node.op)?;
    let out_shape: Vec<usize> = (0..rank)
        .filter_map(|i| match (axes.contains(&i), keep) {
            (true, true) => Some(1),
            (true, false) => None,
            (false, _) => Some(shape[i]),
        })
        .collect();
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    let y = if axes.windows(2).all(|w| w[1] == w[0] + 1) {
        let (a0, a1) = (axes[0], *axes.last()?);
        let outer: usize = shape[..a0].iter().product();
        let inner: usize = shape[a1 + 1..].iter().product();
        blocked_par(op, v, (outer, count, inner), pool)
    } else {
        scattered(op, v, shape, &axes)
    };
    Some(Tensor::from_vec(out_shape, y))
}

/// `arg_max` / `arg_min` (i64 indices), or `None` where the interpreter runs it.
pub fn arg(node: &Node, ins: &[Option<&Tensor>]) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let shape = x.shape();
    let rank = shape.len();
    let a = node.attrs.int_or("axis", 0).ok()?;
    let a = usize::try_from(if a < 0 { a + rank as i64 } else { a })
        .ok()
        .filter(|&a| a < rank)?;
    let keep = node.attrs.int_or("keepdims", 1).ok()? != 0;
    let last = node.attrs.int_or("select_last_index", 0).ok()? != 0;
    let max = match node.op {
        OpKind::ArgMax => true,
        OpKind::ArgMin => false,
        _ => return None,
    };
    let len = shape[a];
    if len == 0 {
        return None;
    }
    let outer: usize = shape[..a].iter().product();
    let inner: usize = shape[a + 1..].iter().product();
    let mut out_shape = shape.to_vec();
    if keep {
        out_shape[a] = 1;
    } else {
        out_shape.remove(a);
    }
    fn go<T: kiln_ir::Elem + Copy + PartialOrd>(
        x: &Tensor,
        (outer, len, inner): (usize, usize, usize),
        max: bool,
        last: bool,
    ) -> Option<Vec<i64>> {
        let v = x.as_slice::<T>()?;
        let better = |c: T, b: T| {
            if max {
                c > b || (last && c == b)
            } else {
                c < b || (last && c == b)
            }
        };
        let mut out = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            if inner == 1 {
                // A contiguous row: the best value carried in a register.
                let row = &v[o * len..(o + 1) * len];
                let (mut best, mut bv) = (0usize, row[0]);
                for (j, &c) in row.iter().enumerate().skip(1) {
                    if better(c, bv) {
                        (best, bv) = (j, c);
                    }
                }
                out.push(best as i64);
                continue;
            }
            // Columns: one running best per inner position, the rows read in order.
            let base = o * len * inner;
            let mut best = vec![0i64; inner];
            let mut bv = v[base..base + inner].to_vec();
            for j in 1..len {
                let row = &v[base + j * inner..base + (j + 1) * inner];
                for ((b, bvi), &c) in best.iter_mut().zip(bv.iter_mut()).zip(row) {
                    if better(c, *bvi) {
                        (*b, *bvi) = (j as i64, c);
                    }
                }
            }
            out.extend(best);
        }
        Some(out)
    }
    let geo = (outer, len, inner);
    let y = go::<f32>(x, geo, max, last)
        .or_else(|| go::<i64>(x, geo, max, last))
        .or_else(|| go::<i32>(x, geo, max, last))?;
    Some(Tensor::from_vec(out_shape, y))
}

/// `cumsum` / `cumprod` along the axis input, or `None` where the interpreter runs it.
pub fn cumulative(node: &Node, ins: &[Option<&Tensor>]) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    let a = (*ins.get(1)?)?;
    let a = match a.as_slice::<i64>() {
        Some(v) => *v.first()?,
        None => i64::from(*a.as_slice::<i32>()?.first()?),
    };
    let rank = x.rank() as i64;
    let axis = usize::try_from(if a < 0 { a + rank } else { a })
        .ok()
        .filter(|&a| a < x.rank())?;
    let excl = node.attrs.int_or("exclusive", 0).ok()? != 0;
    let rev = node.attrs.int_or("reverse", 0).ok()? != 0;
    let shape = x.shape();
    let outer: usize = shape[..axis].iter().product();
    let len = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    fn go<T: Copy>(
        v: &[T],
        (outer, len, inner): (usize, usize, usize),
        (excl, rev): (bool, bool),
        init: T,
        step: impl Fn(T, T) -> T,
    ) -> Vec<T> {
        let mut out = vec![init; v.len()];
        let mut acc = vec![init; inner];
        for o in 0..outer {
            acc.fill(init);
            for jj in 0..len {
                let j = if rev { len - 1 - jj } else { jj };
                let at = (o * len + j) * inner;
                for ((y, a), &e) in out[at..at + inner]
                    .iter_mut()
                    .zip(acc.iter_mut())
                    .zip(&v[at..at + inner])
                {
                    if excl {
                        *y = *a;
                        *a = step(*a, e);
                    } else {
                        *a = step(*a, e);
                        *y = *a;
                    }
                }
            }
        }
        out
    }
    let dims = (outer, len, inner);
    let flags = (excl, rev);
    let prod = node.op == OpKind::CumProd;
    let shape = shape.to_vec();
    Some(if let Some(v) = x.as_slice::<f32>() {
        let y = if prod {
            go(v, dims, flags, 1.0, |a, b| a * b)
        } else {
            go(v, dims, flags, 0.0, |a, b| a + b)
        };
        Tensor::from_vec(shape, y)
    } else if let Some(v) = x.as_slice::<i64>() {
        let y = if prod {
            go(v, dims, flags, 1, i64::wrapping_mul)
        } else {
            go(v, dims, flags, 0, i64::wrapping_add)
        };
        Tensor::from_vec(shape, y)
    } else {
        let v = x.as_slice::<i32>()?;
        let y = if prod {
            go(v, dims, flags, 1, i32::wrapping_mul)
        } else {
            go(v, dims, flags, 0, i32::wrapping_add)
        };
        Tensor::from_vec(shape, y)
    })
}

/// The reductions, with how each combines and finishes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Red {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    LogSum,
    LogSumExp,
    SumSquare,
}

impl Red {
    fn of(op: OpKind) -> Option<Red> {
        use OpKind::*;
        Some(match op {
            ReduceSum => Red::Sum,
            ReduceMean => Red::Mean,
            ReduceMax => Red::Max,
            ReduceMin => Red::Min,
            ReduceProd => Red::Prod,
            ReduceL1 => Red::L1,
            ReduceL2 => Red::L2,
            ReduceLogSum => Red::LogSum,
            ReduceLogSumExp => Red::LogSumExp,
            ReduceSumSquare => Red::SumSquare,
            _ => return None,
        })
    }

    fn init(self) -> f64 {
        match self {
            Red::Prod => 1.0,
            Red::Max => f64::NEG_INFINITY,
            Red::Min => f64::INFINITY,
            _ => 0.0,
        }
    }

    /// Folds element `e` into `a`; `shift` is log-sum-exp's per-slot maximum.
    #[inline(always)]
    fn step(self, a: f64, e: f64, shift: f64) -> f64 {
        match self {
            Red::Sum | Red::Mean | Red::LogSum => a + e,
            Red::Prod => a * e,
            Red::SumSquare | Red::L2 => a + e * e,
            Red::L1 => a + e.abs(),
            Red::LogSumExp => a + (e - shift).exp(),
            // NaN sticks, as in the interpreter: once `a` is NaN no comparison replaces it.
            Red::Max if e > a || e.is_nan() => e,
            Red::Min if e < a || e.is_nan() => e,
            Red::Max | Red::Min => a,
        }
    }

    fn finish(self, a: f64, count: usize, shift: f64) -> f32 {
        (match self {
            Red::Mean => a / count as f64,
            Red::L2 => a.sqrt(),
            Red::LogSum => a.ln(),
            Red::LogSumExp => a.ln() + shift,
            _ => a,
        }) as f32
    }
}

/// log-sum-exp's shift: the slot's maximum (NaN sticks), 0 where it is infinite.
fn finite_shift(m: f64) -> f64 {
    if m.is_infinite() {
        0.0
    } else {
        m
    }
}

/// Independent accumulators of a contiguous row's fold: enough to hide the f64 add
/// latency and to fill a vector register (the sums reassociate; f64 keeps that within the
/// interpreter's rounding of the f32 result).
const LANES: usize = 8;

/// Folds one contiguous row. Sums and max/min run in [`LANES`] independent accumulators
/// (NaN sticks in each lane, and any NaN lane wins when the lanes combine); `prod` and
/// log-sum-exp fold in order, as the interpreter does.
fn fold_row(op: Red, row: &[f32], shift: f64) -> f64 {
    #[inline(always)]
    fn lanes(row: &[f32], init: f64, step: impl Fn(f64, f64) -> f64) -> f64 {
        let mut acc = [init; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, &e) in acc.iter_mut().zip(c) {
                *a = step(*a, e as f64);
            }
        }
        let tail = chunks
            .remainder()
            .iter()
            .fold(init, |a, &e| step(a, e as f64));
        acc.iter().fold(tail, |a, &l| step(a, l))
    }
    match op {
        Red::Sum | Red::Mean | Red::LogSum => lanes(row, 0.0, |a, e| a + e),
        Red::SumSquare | Red::L2 => {
            // Squares are summed per lane; combining lanes adds the partial sums.
            let mut acc = [0f64; LANES];
            let mut chunks = row.chunks_exact(LANES);
            for c in &mut chunks {
                for (a, &e) in acc.iter_mut().zip(c) {
                    *a += e as f64 * e as f64;
                }
            }
            let tail: f64 = chunks
                .remainder()
                .iter()
                .map(|&e| e as f64 * e as f64)
                .sum();
            acc.iter().sum::<f64>() + tail
        }
        Red::L1 => {
            let mut acc = [0f64; LANES];
            let mut chunks = row.chunks_exact(LANES);
            for c in &mut chunks {
                for (a, &e) in acc.iter_mut().zip(c) {
                    *a += (e as f64).abs();
                }
            }
            let tail: f64 = chunks.remainder().iter().map(|&e| (e as f64).abs()).sum();
            acc.iter().sum::<f64>() + tail
        }
        // In f32 (exact: the f64 of an f32 maximum is the maximum of the f64s), so that the
        // lanes compile to vector compares and blends.
        Red::Max => extreme(row, f32::NEG_INFINITY, |e, a| e > a) as f64,
        Red::Min => extreme(row, f32::INFINITY, |e, a| e < a) as f64,
        Red::Prod | Red::LogSumExp => row
            .iter()
            .fold(op.init(), |a, &e| op.step(a, e as f64, shift)),
    }
}

/// A row's maximum (`better = >`) or minimum (`<`) in [`LANES`] lanes; NaN sticks in a
/// lane once seen and wins when the lanes combine, as in the interpreter's ordered fold.
#[inline(always)]
fn extreme(row: &[f32], init: f32, better: impl Fn(f32, f32) -> bool) -> f32 {
    let pick = |a: f32, e: f32| if better(e, a) || e.is_nan() { e } else { a };
    let mut acc = [init; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &e) in acc.iter_mut().zip(c) {
            *a = pick(*a, e);
        }
    }
    let tail = chunks.remainder().iter().fold(init, |a, &e| pick(a, e));
    acc.iter().fold(tail, |a, &l| pick(a, l))
}

/// [`blocked`] with the outer blocks split over `pool` (each block is reduced the same way
/// whatever the split, so the result does not depend on the thread count).
fn blocked_par(
    op: Red,
    v: &[f32],
    (outer, r, inner): (usize, usize, usize),
    pool: &Pool,
) -> Vec<f32> {
    let parts = pool.threads().min(outer).max(1);
    if parts <= 1 || v.len() < PAR_MIN_ELEMS {
        return blocked(op, v, outer, r, inner);
    }
    let outs: Vec<Mutex<Vec<f32>>> = (0..parts).map(|_| Mutex::new(Vec::new())).collect();
    pool.parallel_for(parts, |t| {
        let (a, b) = (outer * t / parts, outer * (t + 1) / parts);
        let y = blocked(op, &v[a * r * inner..b * r * inner], b - a, r, inner);
        *outs[t].lock().unwrap_or_else(|e| e.into_inner()) = y;
    });
    outs.into_iter()
        .flat_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

/// Reduces the middle axis of `v` viewed as `outer × r × inner`.
fn blocked(op: Red, v: &[f32], outer: usize, r: usize, inner: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(outer * inner);
    let mut acc = vec![0f64; inner];
    let mut shift = vec![0f64; inner];
    for o in 0..outer {
        let block = &v[o * r * inner..(o + 1) * r * inner];
        if op == Red::LogSumExp {
            shift.fill(f64::NEG_INFINITY);
            for row in block.chunks_exact(inner.max(1)).take(r) {
                for (s, &e) in shift.iter_mut().zip(row) {
                    *s = Red::Max.step(*s, e as f64, 0.0);
                }
            }
            shift.iter_mut().for_each(|s| *s = finite_shift(*s));
        }
        acc.fill(op.init());
        if inner == 1 {
            let s = shift.first().copied().unwrap_or(0.0);
            y.push(op.finish(fold_row(op, block, s), r, s));
            continue;
        }
        for row in block.chunks_exact(inner.max(1)).take(r) {
            for ((a, &e), &s) in acc.iter_mut().zip(row).zip(&shift) {
                *a = op.step(*a, e as f64, s);
            }
        }
        y.extend(acc.iter().zip(&shift).map(|(&a, &s)| op.finish(a, r, s)));
    }
    y
}

/// Reduces scattered `axes`: each element's output slot by an odometer over `shape`.
fn scattered(op: Red, v: &[f32], shape: &[usize], axes: &[usize]) -> Vec<f32> {
    let kept: Vec<usize> = (0..shape.len())
        .map(|i| if axes.contains(&i) { 1 } else { shape[i] })
        .collect();
    let m: usize = kept.iter().product();
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    let kst = kiln_ir::tensor::strides(&kept);
    let step: Vec<usize> = (0..shape.len())
        .map(|i| if axes.contains(&i) { 0 } else { kst[i] })
        .collect();
    // Slot of each element in order (an odometer over `shape`).
    let slots = {
        let step = &step;
        move || {
            let mut idx = vec![0usize; shape.len()];
            let mut slot = 0usize;
            (0..v.len()).map(move |_| {
                let s = slot;
                for d in (0..shape.len()).rev() {
                    idx[d] += 1;
                    slot += step[d];
                    if idx[d] < shape[d] {
                        break;
                    }
                    slot -= step[d] * shape[d];
                    idx[d] = 0;
                }
                s
            })
        }
    };
    let mut shift = vec![0f64; m];
    if op == Red::LogSumExp {
        shift.fill(f64::NEG_INFINITY);
        for (&e, s) in v.iter().zip(slots()) {
            shift[s] = Red::Max.step(shift[s], e as f64, 0.0);
        }
        shift.iter_mut().for_each(|s| *s = finite_shift(*s));
    }
    let mut acc = vec![op.init(); m];
    for (&e, s) in v.iter().zip(slots()) {
        acc[s] = op.step(acc[s], e as f64, shift[s]);
    }
    acc.iter()
        .zip(&shift)
        .map(|(&a, &s)| op.finish(a, count, s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};
    use kiln_reference::{compare, Tolerance};

    /// f32 results of f64 accumulations: both round the same f64 sums; log/exp differ in
    /// the last bits.
    const TOL: Tolerance = Tolerance::AllClose {
        rtol: 1e-5,
        atol: 1e-6,
    };

    const OPS: [OpKind; 10] = [
        OpKind::ReduceSum,
        OpKind::ReduceMean,
        OpKind::ReduceMax,
        OpKind::ReduceMin,
        OpKind::ReduceProd,
        OpKind::ReduceL1,
        OpKind::ReduceL2,
        OpKind::ReduceLogSum,
        OpKind::ReduceLogSumExp,
        OpKind::ReduceSumSquare,
    ];

    fn node(op: OpKind, attrs: Attrs) -> Node {
        Node {
            op,
            attrs,
            inputs: vec![Some(ValueId(0)), Some(ValueId(1))],
            outputs: vec![ValueId(2)],
            name: String::new(),
        }
    }

    fn data(n: usize, seed: u64, specials: bool) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if specials && s.is_multiple_of(13) {
                    [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][(s >> 5) as usize % 3]
                } else {
                    // Positive values keep log_sum and l2 real; prod stays moderate.
                    ((s >> 40) as f32 / (1u64 << 24) as f32) * 1.5 + 0.25
                }
            })
            .collect()
    }

    #[test]
    fn reductions_match_the_interpreter_on_any_axes() {
        // Rows longer than the accumulator lanes, with ragged tails, too.
        let shapes: [&[usize]; 7] = [
            &[7],
            &[3, 5],
            &[2, 3, 4],
            &[2, 1, 3, 5],
            &[4, 0, 3],
            &[3, 37],
            &[2, 2, 67],
        ];
        let mut cases = 0;
        for (si, shape) in shapes.iter().enumerate() {
            let rank = shape.len() as i64;
            // Every subset of axes (negative spellings too), and the empty list.
            for mask in 0..(1u32 << rank) {
                let axes: Vec<i64> = (0..rank)
                    .filter(|a| mask & (1 << a) != 0)
                    .map(|a| if a % 2 == 1 { a - rank } else { a })
                    .collect();
                for keep in [0, 1] {
                    for op in OPS {
                        for specials in [false, true] {
                            let n: usize = shape.iter().product();
                            let x = Tensor::from_vec(
                                shape.to_vec(),
                                data(n, si as u64 * 31 + mask as u64, specials),
                            );
                            let a = Tensor::from_vec(vec![axes.len()], axes.clone());
                            let attrs = Attrs::new().with("keepdims", Attr::Int(keep));
                            let ins = [Some(&x), Some(&a)];
                            let want = kiln_ir::ops::eval(op, &attrs, &ins).expect("reference");
                            let got = run(&node(op, attrs), &ins, &Pool::single()).expect("native");
                            let r = compare(&got, &want[0], TOL);
                            assert!(r.ok, "{op:?} {shape:?} axes {axes:?} keep {keep}: {r:?}");
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases > 500);
    }

    #[test]
    fn cumulative_sums_and_products_match_the_interpreter() {
        let xs = [
            Tensor::from_vec(vec![2, 3, 4], data(24, 3, true)),
            Tensor::from_vec(
                vec![3, 5],
                (0..15).map(|i| i * 7 - 40).collect::<Vec<i64>>(),
            ),
            Tensor::from_vec(vec![4], vec![i32::MAX, 1, -3, 2]),
        ];
        for x in &xs {
            for op in [OpKind::CumSum, OpKind::CumProd] {
                for axis in -(x.rank() as i64)..x.rank() as i64 {
                    for (excl, rev) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        let attrs = Attrs::new()
                            .with("exclusive", Attr::Int(excl))
                            .with("reverse", Attr::Int(rev));
                        let a = Tensor::from_vec(vec![], vec![axis]);
                        let ins = [Some(x), Some(&a)];
                        let want = kiln_ir::ops::eval(op, &attrs, &ins).expect("reference");
                        let got = cumulative(&node(op, attrs), &ins).expect("native");
                        assert_eq!(
                            got,
                            want[0],
                            "{op:?} {:?} axis {axis} {excl} {rev}",
                            x.shape()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn noop_with_empty_axes_and_bad_axes() {
        let x = Tensor::from_vec(vec![2, 3], data(6, 1, false));
        let noop = Attrs::new().with("noop_with_empty_axes", Attr::Int(1));
        let got = run(
            &node(OpKind::ReduceSum, noop),
            &[Some(&x), None],
            &Pool::single(),
        )
        .expect("identity");
        assert_eq!(got, x);
        let bad = Tensor::from_vec(vec![1], vec![5i64]);
        assert!(run(
            &node(OpKind::ReduceSum, Attrs::new()),
            &[Some(&x), Some(&bad)],
            &Pool::single()
        )
        .is_none());
        let ints = Tensor::from_vec(vec![2], vec![1i64, 2]);
        assert!(run(
            &node(OpKind::ReduceSum, Attrs::new()),
            &[Some(&ints), None],
            &Pool::single()
        )
        .is_none());
    }

    #[test]
    fn a_large_reduction_gives_the_same_bits_on_any_thread_count() {
        // Above the threading threshold, with outer blocks that do not split evenly.
        let shape = vec![7, 301, 131];
        let n: usize = shape.iter().product();
        assert!(n >= super::PAR_MIN_ELEMS);
        let x = Tensor::from_vec(shape, data(n, 5, true));
        let pools = [Pool::single(), Pool::new(2).unwrap(), Pool::new(3).unwrap()];
        for op in OPS {
            for axes in [vec![-1i64], vec![1], vec![1, 2]] {
                let a = Tensor::from_vec(vec![axes.len()], axes.clone());
                let ins = [Some(&x), Some(&a)];
                let want = kiln_ir::ops::eval(op, &Attrs::new(), &ins).expect("reference");
                let runs: Vec<Tensor> = pools
                    .iter()
                    .map(|p| run(&node(op, Attrs::new()), &ins, p).expect("native"))
                    .collect();
                let r = compare(&runs[0], &want[0], TOL);
                assert!(r.ok, "{op:?} axes {axes:?}: {r:?}");
                for (t, got) in runs.iter().enumerate().skip(1) {
                    assert_eq!(got, &runs[0], "{op:?} axes {axes:?}, pool {t}");
                }
            }
        }
    }
}
