//! Running a compiled row function (`fn(in_ptrs, out_ptrs, n)`, one call per row of a loop
//! kernel's domain: the ABI both the Cranelift JIT and LLVM AOT backends emit) over every
//! row, split across a [`ParallelFor`] when the kernel is big enough to pay for it.

use super::arena::Outputs;
use super::par::{ParallelFor, Serial};
use crate::pool::SharedMut;
use kiln_ir::{Buf, Tensor};
use kiln_plan::layout::LoopShape;
use kiln_plan::loop_ir::{Expr, LoopKernel, UnOp};

/// A compiled row function: `fn(in_ptrs, out_ptrs, n)`.
pub type RowFn = unsafe extern "C" fn(*const *const f32, *const *mut f32, i64);

/// Estimated work (domain elements × expression evaluations per element, all passes)
/// below which a loop kernel runs on the calling thread. A layer_norm over 128×768 is
/// about 4.5M units and runs in ~0.07 ms serially; the pool's workers spin between a run's
/// kernels, so handing them tasks costs a microsecond or two and kernels from a few
/// microseconds up split.
pub const PAR_MIN_WORK: usize = 1 << 18;
/// Tasks per worker when a kernel is split, so uneven rows still balance.
const TASKS_PER_THREAD: usize = 4;
/// Weight of a transcendental relative to a plain arithmetic expression in the work
/// estimate (an inlined exp is about 25 vector instructions).
const TRANSCENDENTAL_WEIGHT: usize = 16;

/// Runs a compiled row function over every row of the bound domain, on the calling thread.
pub fn run_row_fn(f: RowFn, k: &LoopKernel, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
    run_rows(f, k, inputs, &Serial, usize::MAX, &mut Outputs::none())
}

/// Runs a compiled row function, splitting the rows through `par` when the kernel's
/// estimated work reaches [`PAR_MIN_WORK`], its outputs in their planned regions of `out`
/// where they have one. Every row is computed by the same code whichever thread runs it, so
/// results are bit-identical for any thread count.
pub fn run_row_fn_par(
    f: RowFn,
    k: &LoopKernel,
    inputs: &[&Tensor],
    par: &dyn ParallelFor,
    out: &mut Outputs,
) -> Result<Vec<Tensor>, String> {
    run_rows(f, k, inputs, par, PAR_MIN_WORK, out)
}

/// The work estimate of one domain element of `k` (see [`PAR_MIN_WORK`]).
fn work_per_element(k: &LoopKernel) -> usize {
    let per_pass: usize = k
        .exprs
        .iter()
        .map(|e| match e {
            Expr::Un(op, _) => un_weight(*op),
            _ => 1,
        })
        .sum();
    per_pass * (1 + k.reductions.len())
}

/// Kept out of line so the op byte is only read for `Un` expressions: inlined, LLVM loads
/// it speculatively for every variant (where it is padding) and valgrind, which checks the
/// AOT runtime, reports a branch on uninitialised memory.
#[inline(never)]
fn un_weight(op: UnOp) -> usize {
    if op.is_transcendental() {
        TRANSCENDENTAL_WEIGHT
    } else {
        1
    }
}

/// Runs `f` over every row, splitting through `par` when the estimated work reaches
/// `min_work`; outputs go to their regions in `out` where they have one.
pub fn run_rows(
    f: RowFn,
    k: &LoopKernel,
    inputs: &[&Tensor],
    par: &dyn ParallelFor,
    min_work: usize,
    out: &mut Outputs,
) -> Result<Vec<Tensor>, String> {
    let ls = LoopShape::bind(k, inputs)?;
    let data: Vec<&[f32]> = inputs
        .iter()
        .map(|t| t.as_slice::<f32>().ok_or("loop kernel input is not f32"))
        .collect::<Result<_, _>>()?;
    let (n, numel) = (ls.n, ls.numel());
    // An output's planned region, else fresh memory left uninitialised: the row function
    // writes all `n` values of every row (zeroing first cost as much as a simple
    // elementwise kernel itself).
    let mut regions: Vec<Option<Buf<f32>>> = (0..k.outputs.len())
        .map(|i| out.region::<f32>(i, numel))
        .collect();
    let mut outs: Vec<Vec<f32>> = regions
        .iter()
        .map(|r| Vec::with_capacity(if r.is_some() { 0 } else { numel }))
        .collect();
    let n_i64 = i64::try_from(n).map_err(|_| "row too long")?;
    let bases: Vec<SharedMut> = regions
        .iter_mut()
        .zip(outs.iter_mut())
        .map(|(r, o)| match r {
            Some(b) => SharedMut::new(b.as_mut_ptr()),
            None => SharedMut::new(o.spare_capacity_mut().as_mut_ptr().cast()),
        })
        .collect();
    let run_range = |lo: usize, hi: usize| {
        let mut in_ptrs: Vec<*const f32> = vec![std::ptr::null(); data.len()];
        let mut out_ptrs: Vec<*mut f32> = vec![std::ptr::null_mut(); bases.len()];
        ls.for_rows(lo, hi, |row, offs| {
            for ((p, d), &o) in in_ptrs.iter_mut().zip(&data).zip(offs) {
                // `bind` checked that every row read (o..o+n, or o alone when broadcast)
                // lies inside the input.
                *p = d[o..].as_ptr();
            }
            for (p, b) in out_ptrs.iter_mut().zip(&bases) {
                // SAFETY: row < rows, so row * n + n <= numel, the buffer's length.
                *p = unsafe { b.get().add(row * n) };
            }
            // SAFETY: pointers cover `n` elements (or one, for broadcast inputs) per `bind`.
            unsafe { f(in_ptrs.as_ptr(), out_ptrs.as_ptr(), n_i64) };
        });
    };
    let work = ls.numel().saturating_mul(work_per_element(k));
    let threads = par.threads();
    if threads <= 1 || ls.rows < 2 || work < min_work {
        run_range(0, ls.rows);
    } else {
        let tasks = (threads * TASKS_PER_THREAD).min(ls.rows);
        let chunk = ls.rows.div_ceil(tasks);
        par.run(tasks, &|t| run_range(t * chunk, (t + 1) * chunk));
    }
    drop(bases);
    Ok(outs
        .into_iter()
        .zip(regions)
        .map(|(mut v, r)| match r {
            Some(b) => Tensor::from_buf(ls.shape.clone(), b),
            None => {
                // SAFETY: every row `0..rows` was run above, each writing its `n` values,
                // and `rows · n = numel` (the capacity reserved).
                unsafe { v.set_len(numel) };
                Tensor::from_vec(ls.shape.clone(), v)
            }
        })
        .collect())
}
