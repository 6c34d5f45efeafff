//! Running a compiled row function (`fn(in_ptrs, out_ptrs, n, m, in_strides)`, one call per
//! run of `m` rows of a loop kernel's domain: the ABI both the Cranelift JIT and LLVM AOT
//! backends emit) over every row, split across a [`ParallelFor`] when the kernel is big
//! enough to pay for it.

use super::arena::Outputs;
use super::par::{ParallelFor, Serial};
use crate::native::vmath::{self, Isa};
use crate::pool::SharedMut;
use kiln_ir::{Buf, Tensor};
use kiln_plan::layout::LoopShape;
use kiln_plan::loop_ir::{BinOp, Expr, ExprId, InnerAccess, LoopKernel, UnOp};
use kiln_plan::vmath::Func;
use smallvec::{smallvec, SmallVec};

/// A compiled row function: `fn(in_ptrs, out_ptrs, n, m, in_strides)` computes `m` rows of
/// `n` elements. Row `r < m` reads input `i` from `in_ptrs[i] + r * in_strides[i]` (elements;
/// 0 where the input is broadcast across rows) and writes output `o` at
/// `out_ptrs[o] + r * n`.
pub type RowFn = unsafe extern "C" fn(*const *const f32, *const *mut f32, i64, i64, *const i64);

/// A vector-math function the runtime applies to a kernel's only output, run by run, right
/// after the row function wrote it: the JIT leaves an output's root transcendental to the
/// runtime's AVX-512/AVX2 routines (Cranelift's vectors are 4 lanes). Both compute the same
/// recipe (`kiln_plan::vmath`), so the bits do not depend on who applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostMap {
    /// The function.
    pub func: Func,
    /// Where it runs ([`Isa::available`] on this CPU).
    pub isa: Isa,
}

impl PostMap {
    /// `func` on the widest instruction set this CPU has, or `None` with neither AVX2 nor
    /// AVX-512 (the JIT's 4-lane inline code then beats a scalar map).
    pub fn widest(func: Func) -> Option<PostMap> {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|i| i.available())
            .map(|isa| PostMap { func, isa })
    }
}

/// Values per call of a post-mapped kernel (16 KiB of f32: the output is still in L1 when
/// the map reads it back).
const POST_CHUNK: usize = 4096;

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
pub fn run_row_fn(
    f: RowFn,
    post: Option<PostMap>,
    k: &LoopKernel,
    inputs: &[&Tensor],
) -> Result<Vec<Tensor>, String> {
    run_rows(
        f,
        post,
        k,
        inputs,
        &Serial,
        usize::MAX,
        &mut Outputs::none(),
    )
}

/// Runs a compiled row function, splitting the rows through `par` when the kernel's
/// estimated work reaches [`PAR_MIN_WORK`], its outputs in their planned regions of `out`
/// where they have one. Every row is computed by the same code whichever thread runs it, so
/// results are bit-identical for any thread count.
pub fn run_row_fn_par(
    f: RowFn,
    post: Option<PostMap>,
    k: &LoopKernel,
    inputs: &[&Tensor],
    par: &dyn ParallelFor,
    out: &mut Outputs,
) -> Result<Vec<Tensor>, String> {
    run_rows(f, post, k, inputs, par, PAR_MIN_WORK, out)
}

/// The work estimate of one domain element of `k` (see [`PAR_MIN_WORK`]).
pub(crate) fn work_per_element(k: &LoopKernel) -> usize {
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

/// The root of `k`'s only output when it is a transcendental the runtime's vector math
/// maps (exp, log, tanh, sigmoid, erf, gelu, softplus, and `x·sigmoid(x)` as silu): the
/// function and the expression it is applied to. A JIT may stop its code below that root
/// and leave the function to a [`PostMap`].
pub fn post_root(k: &LoopKernel) -> Option<(Func, ExprId)> {
    let [(_, root)] = k.outputs[..] else {
        return None;
    };
    match k.exprs[root] {
        Expr::Un(op, x) => Func::of(op).map(|f| (f, x)),
        // silu(x) = x·sigmoid(x), the recipe's own order of operations (a product is
        // commutative bit for bit).
        Expr::Bin(BinOp::Mul, a, b) => match (&k.exprs[a], &k.exprs[b]) {
            (_, Expr::Un(UnOp::Sigmoid, s)) if *s == a => Some((Func::Silu, a)),
            (Expr::Un(UnOp::Sigmoid, s), _) if *s == b => Some((Func::Silu, b)),
            _ => None,
        },
        _ => None,
    }
}

/// The input `k` only maps with `func`: `k` (the whole kernel, root included) has no
/// reductions and its root is `func` of a load of one input read along the row. The
/// runtime then maps that input straight into the output.
fn direct_source(k: &LoopKernel, func: Func) -> Option<usize> {
    if !k.reductions.is_empty() {
        return None;
    }
    match post_root(k)? {
        (f, arg) if f == func => match k.exprs[arg] {
            Expr::Load(j) if k.inputs[j].inner == InnerAccess::Contiguous => Some(j),
            _ => None,
        },
        _ => None,
    }
}

/// Runs `f` over every row, splitting through `par` when the estimated work reaches
/// `min_work`; outputs go to their regions in `out` where they have one. `post`, when
/// given, is applied to the kernel's only output after each run: `k` is then the whole
/// kernel and `f` its code below the root ([`post_root`]).
pub fn run_rows(
    f: RowFn,
    post: Option<PostMap>,
    k: &LoopKernel,
    inputs: &[&Tensor],
    par: &dyn ParallelFor,
    min_work: usize,
    out: &mut Outputs,
) -> Result<Vec<Tensor>, String> {
    let ls = LoopShape::bind(k, inputs)?;
    let data: SmallVec<[&[f32]; 6]> = inputs
        .iter()
        .map(|t| t.as_slice::<f32>().ok_or("loop kernel input is not f32"))
        .collect::<Result<_, _>>()?;
    let (n, numel) = (ls.n, ls.numel());
    if let Some(p) = post {
        if k.outputs.len() != 1 {
            return Err("a post-map needs a kernel with one output".into());
        }
        if !p.isa.available() {
            return Err(format!("a post-map on {:?}, which this CPU lacks", p.isa));
        }
    }
    // An output's planned region, else fresh memory left uninitialised: the row function
    // writes all `n` values of every row (zeroing first cost as much as a simple
    // elementwise kernel itself).
    let mut regions: SmallVec<[Option<Buf<f32>>; 2]> = (0..k.outputs.len())
        .map(|i| out.region::<f32>(i, numel))
        .collect();
    let mut outs: SmallVec<[Vec<f32>; 2]> = regions
        .iter()
        .map(|r| Vec::with_capacity(if r.is_some() { 0 } else { numel }))
        .collect();
    let n_i64 = i64::try_from(n).map_err(|_| "row too long")?;
    let bases: SmallVec<[SharedMut; 2]> = regions
        .iter_mut()
        .zip(outs.iter_mut())
        .map(|(r, o)| match r {
            Some(b) => SharedMut::new(b.as_mut_ptr()),
            None => SharedMut::new(o.spare_capacity_mut().as_mut_ptr().cast()),
        })
        .collect();
    let run_strides: SmallVec<[i64; 6]> = ls
        .run_strides()
        .into_iter()
        .map(|st| i64::try_from(st).map_err(|_| "input stride too large"))
        .collect::<Result<_, _>>()?;
    // A kernel that is only the post-mapped function of one input, read row by row as the
    // output is written: the runtime maps that input straight into the output, one pass
    // instead of the row function's copy and a second pass in place.
    let direct = post.and_then(|p| direct_source(k, p.func));
    let rows_per_call = match post {
        Some(_) => (POST_CHUNK / n.max(1)).max(1),
        None => usize::MAX,
    };
    let run_range = |lo: usize, hi: usize| {
        let mut in_ptrs: SmallVec<[*const f32; 6]> = smallvec![std::ptr::null(); data.len()];
        let mut out_ptrs: SmallVec<[*mut f32; 2]> = smallvec![std::ptr::null_mut(); bases.len()];
        ls.for_row_runs(lo, hi, |row, offs, m| {
            // A post-mapped run is cut into calls of about POST_CHUNK values, so the map
            // reads what the row function just wrote from L1.
            for s0 in (0..m).step_by(rows_per_call) {
                let mm = rows_per_call.min(m - s0);
                for (((p, d), &o), &st) in in_ptrs.iter_mut().zip(&data).zip(offs).zip(&run_strides)
                {
                    // `bind` checked that every row read (o..o+n, or o alone when broadcast)
                    // lies inside the input, the run's later rows included.
                    *p = d[o + s0 * st as usize..].as_ptr();
                }
                for (p, b) in out_ptrs.iter_mut().zip(&bases) {
                    // SAFETY: row + m <= rows, so (row + m) * n <= numel, the buffer's length.
                    *p = unsafe { b.get().add((row + s0) * n) };
                }
                if let (Some(j), Some(p)) = (direct, post) {
                    // Rows that follow each other in the input (always, for a kernel whose
                    // domain is its one input's shape): one map over the whole call.
                    if mm == 1 || run_strides[j] as usize == n {
                        // SAFETY: input `j` (read along the row, checked by
                        // `direct_source`) holds these `mm · n` values from the run's start,
                        // per `bind`; the output's rows are this range's alone, and an output
                        // region is the input's own buffer or disjoint from it (the arena
                        // plan), as `map_raw` allows.
                        let done = unsafe {
                            vmath::map_raw(p.func, p.isa, in_ptrs[j], out_ptrs[0], mm * n)
                        };
                        debug_assert!(done, "the isa was checked above");
                        continue;
                    }
                }
                // SAFETY: pointers cover `mm` rows of `n` elements (or one element per row,
                // for inputs broadcast along the row) per `bind`; `mm` fits i64 as rows do.
                unsafe {
                    f(
                        in_ptrs.as_ptr(),
                        out_ptrs.as_ptr(),
                        n_i64,
                        mm as i64,
                        run_strides.as_ptr(),
                    )
                };
                if let Some(p) = post {
                    // SAFETY: the call above wrote these mm·n values of the only output,
                    // which no other range touches.
                    let ys = unsafe { std::slice::from_raw_parts_mut(out_ptrs[0], mm * n) };
                    let done = vmath::map(p.func, p.isa, ys);
                    debug_assert!(done, "the isa was checked above");
                }
            }
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
