//! Running loop kernels through ahead-of-time compiled row functions
//! (`fn(ins, outs, n)`, one call per row, the same ABI as the Cranelift JIT), with rows
//! split over threads when a kernel is large enough to pay for it.

use kiln_ir::Tensor;
use kiln_runtime::kernel::{LoopKernel, LoopRunner, LoopShape};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A compiled row function: `fn(in_ptrs, out_ptrs, n)`.
pub type RowFn = unsafe extern "C" fn(*const *const f32, *const *mut f32, i64);

/// Below this many domain elements a loop kernel runs on the calling thread only: starting
/// threads (tens of microseconds, far more on a loaded machine) costs more than the work;
/// bert_base_1l's [1, 128, 768] kernels (98K elements) ran 20x slower split over 2 threads.
const PAR_MIN_ELEMS: usize = 1 << 18;

/// Runs loop kernel `i` with `fns[i]`, falling back to the portable evaluator where a
/// kernel has no compiled code.
pub struct AotRunner {
    /// Row function per plan kernel (`None` for non-loop kernels).
    pub fns: Vec<Option<RowFn>>,
    /// Threads used for large loop kernels (at least 1).
    pub threads: AtomicUsize,
}

impl LoopRunner for AotRunner {
    fn run_loop(
        &self,
        index: usize,
        k: &LoopKernel,
        inputs: &[&Tensor],
    ) -> Result<Vec<Tensor>, String> {
        match self.fns.get(index).copied().flatten() {
            Some(f) => run_row_fn(f, k, inputs, self.threads.load(Ordering::Relaxed)),
            None => kiln_runtime::kernel::eval::run_loop(k, inputs),
        }
    }
}

/// Raw pointers crossing into worker threads.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: each worker writes a disjoint range of rows of every output (see `run_row_fn`).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// Runs a row function over every row of the bound domain, rows split over up to
/// `threads` threads.
pub fn run_row_fn(
    f: RowFn,
    k: &LoopKernel,
    inputs: &[&Tensor],
    threads: usize,
) -> Result<Vec<Tensor>, String> {
    let ls = LoopShape::bind(k, inputs)?;
    let data: Vec<&[f32]> = inputs
        .iter()
        .map(|t| t.as_slice::<f32>().ok_or("loop kernel input is not f32"))
        .collect::<Result<_, _>>()?;
    let n = ls.n;
    let n_i64 = i64::try_from(n).map_err(|_| "row too long")?;
    let mut outs: Vec<Vec<f32>> = vec![vec![0.0; ls.numel()]; k.outputs.len()];
    // Every row's input offsets, computed once so rows can be handed out in ranges.
    let mut offsets: Vec<usize> = Vec::with_capacity(ls.rows * data.len());
    ls.for_each_row(|_, offs| offsets.extend_from_slice(offs));
    let rows = if n == 0 { 0 } else { ls.rows };
    let out_ptrs: Vec<SendPtr<f32>> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
    let run_rows = |lo: usize, hi: usize| {
        let mut ins: Vec<*const f32> = vec![std::ptr::null(); data.len()];
        let mut outp: Vec<*mut f32> = vec![std::ptr::null_mut(); out_ptrs.len()];
        for row in lo..hi {
            let offs = &offsets[row * data.len()..(row + 1) * data.len()];
            for ((p, d), &o) in ins.iter_mut().zip(&data).zip(offs) {
                // `bind` checked that every row read (o..o+n, or o alone when broadcast)
                // lies inside the input.
                *p = d[o..].as_ptr();
            }
            for (p, o) in outp.iter_mut().zip(&out_ptrs) {
                // SAFETY: row * n + n <= numel, the length of every output buffer.
                *p = unsafe { o.0.add(row * n) };
            }
            // SAFETY: pointers cover `n` elements (or one, for broadcast inputs) per
            // `bind`; the function was compiled for this kernel (fingerprint checked).
            unsafe { f(ins.as_ptr(), outp.as_ptr(), n_i64) };
        }
    };
    let threads = threads.max(1).min(rows.max(1));
    if threads == 1 || rows * n < PAR_MIN_ELEMS {
        run_rows(0, rows);
    } else {
        std::thread::scope(|s| {
            for t in 1..threads {
                let run_rows = &run_rows;
                s.spawn(move || run_rows(rows * t / threads, rows * (t + 1) / threads));
            }
            run_rows(0, rows / threads);
        });
    }
    Ok(outs
        .into_iter()
        .map(|v| Tensor::from_vec(ls.shape.clone(), v))
        .collect())
}
