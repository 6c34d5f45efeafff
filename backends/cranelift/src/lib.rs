//! kiln-cranelift: the JIT CPU backend. [`compile`] partitions an optimised graph with the
//! runtime's kernel layer, JIT-compiles every loop kernel (fused elementwise, broadcast and
//! last-axis reductions) to native code with Cranelift, and runs the rest (contractions,
//! other ops) through the runtime's routines.

mod codegen;
mod vmath;

pub use codegen::RowFn;
use cranelift_jit::JITModule;
use kiln_ir::{EvalError, Graph, Tensor};
use kiln_runtime::kernel::{
    partition, Kernel, LoopKernel, LoopRunner, LoopShape, ParallelFor, Plan, RunReport, Serial,
};
use std::sync::Arc;

/// Estimated work (domain elements × expression evaluations per element, all passes)
/// below which a loop kernel runs on the calling thread. A layer_norm over 128×768 is
/// about 4.5M units and runs in ~0.17 ms serially; splitting costs a thread hand-off (tens
/// of microseconds with scoped threads), so only kernels of roughly 0.6 ms and more split.
pub const PAR_MIN_WORK: usize = 1 << 24;
/// Tasks per worker when a kernel is split, so uneven rows still balance.
const TASKS_PER_THREAD: usize = 4;
/// Weight of a transcendental relative to a plain arithmetic expression in the work
/// estimate (an inlined exp is about 25 vector instructions).
const TRANSCENDENTAL_WEIGHT: usize = 16;

/// How to compile and run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JitOptions {
    /// Threads used inside kernels; 0 means one per physical core.
    pub threads: usize,
}

/// Why a graph could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The partitioner rejected the graph (a constant failed to evaluate).
    #[error("partitioning failed: {0}")]
    Partition(String),
    /// Cranelift failed on a kernel.
    #[error("code generation failed for {kernel}: {msg}")]
    Codegen {
        /// The kernel's label.
        kernel: String,
        /// Cranelift's message.
        msg: String,
    },
}

/// Owns the JIT code memory. The module is only touched during [`compile`]; afterwards
/// the code is immutable and the function pointers are plain `extern "C"` functions.
struct CodeHolder(#[allow(dead_code)] JITModule);
// SAFETY: after finalisation nothing mutates the module; the code pages it owns are
// read-execute and shared read-only by every thread calling the row functions.
unsafe impl Send for CodeHolder {}
unsafe impl Sync for CodeHolder {}

/// A graph compiled for the CPU: JIT row functions for loop kernels, the runtime for the rest.
pub struct JitExecutable {
    plan: Plan,
    threads: usize,
    pool: kiln_runtime::pool::Pool,
    par: Arc<dyn ParallelFor>,
    fns: Vec<Option<RowFn>>,
    _code: CodeHolder,
}

impl std::fmt::Debug for JitExecutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitExecutable")
            .field("kernels", &self.plan.kernels.len())
            .field("jit_kernels", &self.jit_kernel_count())
            .finish()
    }
}

/// Compiles `g` (typically after the default pass pipeline) with default options.
pub fn compile(g: &Graph) -> Result<JitExecutable, CompileError> {
    compile_with(g, &JitOptions::default())
}

/// Compiles `g` (typically after the default pass pipeline).
pub fn compile_with(g: &Graph, opts: &JitOptions) -> Result<JitExecutable, CompileError> {
    let threads = if opts.threads == 0 {
        kiln_runtime::kernels::gemm::physical_cores()
    } else {
        opts.threads
    };
    let plan = partition(g).map_err(CompileError::Partition)?;
    let mut module = codegen::new_module().map_err(|msg| CompileError::Codegen {
        kernel: "module".into(),
        msg,
    })?;
    let mut ids = vec![];
    for (i, k) in plan.kernels.iter().enumerate() {
        ids.push(match k {
            Kernel::Loop(l) => Some(
                codegen::define(&mut module, l, &format!("loop{i}")).map_err(|msg| {
                    CompileError::Codegen {
                        kernel: plan.label(i),
                        msg,
                    }
                })?,
            ),
            _ => None,
        });
    }
    module
        .finalize_definitions()
        .map_err(|e| CompileError::Codegen {
            kernel: "module".into(),
            msg: e.to_string(),
        })?;
    let fns = ids
        .into_iter()
        .map(|id| {
            id.map(|id| {
                let p = module.get_finalized_function(id);
                // SAFETY: `define` gave this function the `RowFn` signature.
                unsafe { std::mem::transmute::<*const u8, RowFn>(p) }
            })
        })
        .collect();
    let pool = kiln_runtime::pool::Pool::new(threads).map_err(|e| CompileError::Codegen {
        kernel: "thread pool".into(),
        msg: e.to_string(),
    })?;
    Ok(JitExecutable {
        plan,
        threads,
        par: Arc::new(pool.clone()),
        pool,
        fns,
        _code: CodeHolder(module),
    })
}

impl JitExecutable {
    /// The partitioned plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The number of threads kernels use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Replaces the parallel-for loop kernels split their rows through (by default
    /// [`kiln_runtime::kernel::default_parallel`] of [`JitExecutable::threads`]).
    pub fn set_parallel(&mut self, par: Arc<dyn ParallelFor>) {
        self.threads = par.threads();
        self.par = par;
    }

    /// Runs on inputs in graph order, timing every kernel and planning memory.
    pub fn run_profiled(&self, inputs: Vec<Tensor>) -> Result<(Vec<Tensor>, RunReport), EvalError> {
        let mut report = RunReport::default();
        let outs = self.plan.run_with(inputs, self, Some(&mut report))?;
        Ok((outs, report))
    }

    /// How many kernels run as JIT code.
    pub fn jit_kernel_count(&self) -> usize {
        self.fns.iter().filter(|f| f.is_some()).count()
    }

    /// Runs on inputs given by name; outputs come back in graph order.
    pub fn run_named(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<Tensor>, EvalError> {
        self.plan.run_named(inputs, self)
    }

    /// Runs on inputs in graph order.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EvalError> {
        self.plan.run(inputs, self)
    }
}

impl LoopRunner for JitExecutable {
    fn run_loop(
        &self,
        index: usize,
        k: &LoopKernel,
        inputs: &[&Tensor],
    ) -> Result<Vec<Tensor>, String> {
        let Some(f) = self.fns.get(index).copied().flatten() else {
            return kiln_runtime::kernel::eval::run_loop(k, inputs);
        };
        run_row_fn_par(f, k, inputs, &*self.par)
    }

    fn pool(&self) -> Option<&kiln_runtime::pool::Pool> {
        Some(&self.pool)
    }
}

/// One loop kernel compiled on its own (for tests and tools).
pub struct LoopFn {
    f: RowFn,
    kernel: LoopKernel,
    _code: CodeHolder,
}

impl std::fmt::Debug for LoopFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopFn")
            .field("kernel", &self.kernel)
            .finish()
    }
}

/// JIT-compiles one loop kernel.
pub fn compile_loop(k: &LoopKernel) -> Result<LoopFn, CompileError> {
    let err = |msg: String| CompileError::Codegen {
        kernel: "loop".into(),
        msg,
    };
    let mut module = codegen::new_module().map_err(err)?;
    let id = codegen::define(&mut module, k, "loop").map_err(err)?;
    module
        .finalize_definitions()
        .map_err(|e| err(e.to_string()))?;
    let p = module.get_finalized_function(id);
    // SAFETY: `define` gave this function the `RowFn` signature.
    let f = unsafe { std::mem::transmute::<*const u8, RowFn>(p) };
    Ok(LoopFn {
        f,
        kernel: k.clone(),
        _code: CodeHolder(module),
    })
}

impl LoopFn {
    /// Runs the kernel on its inputs (one per kernel input), on the calling thread.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        run_row_fn(self.f, &self.kernel, inputs)
    }

    /// Runs the kernel, splitting rows through `par` whenever there are at least two.
    pub fn run_split(
        &self,
        inputs: &[&Tensor],
        par: &dyn ParallelFor,
    ) -> Result<Vec<Tensor>, String> {
        run_rows(self.f, &self.kernel, inputs, par, 0)
    }
}

/// Runs a compiled row function over every row of the bound domain, on the calling thread.
pub fn run_row_fn(f: RowFn, k: &LoopKernel, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
    run_rows(f, k, inputs, &Serial, usize::MAX)
}

/// Runs a compiled row function, splitting the rows through `par` when the kernel's
/// estimated work reaches [`PAR_MIN_WORK`]. Every row is computed by the same code
/// whichever thread runs it, so results are bit-identical for any thread count.
pub fn run_row_fn_par(
    f: RowFn,
    k: &LoopKernel,
    inputs: &[&Tensor],
    par: &dyn ParallelFor,
) -> Result<Vec<Tensor>, String> {
    run_rows(f, k, inputs, par, PAR_MIN_WORK)
}

/// The work estimate of one domain element of `k` (see [`PAR_MIN_WORK`]).
fn work_per_element(k: &LoopKernel) -> usize {
    let per_pass: usize = k
        .exprs
        .iter()
        .map(|e| match e {
            kiln_runtime::kernel::Expr::Un(op, _) if op.is_transcendental() => {
                TRANSCENDENTAL_WEIGHT
            }
            _ => 1,
        })
        .sum();
    per_pass * (1 + k.reductions.len())
}

/// A pointer that may cross threads: every task writes a disjoint range of rows.
#[derive(Clone, Copy)]
struct RowPtr(*mut f32);
// SAFETY: tasks only write the rows they own (see `run_rows`).
unsafe impl Send for RowPtr {}
unsafe impl Sync for RowPtr {}

fn run_rows(
    f: RowFn,
    k: &LoopKernel,
    inputs: &[&Tensor],
    par: &dyn ParallelFor,
    min_work: usize,
) -> Result<Vec<Tensor>, String> {
    let ls = LoopShape::bind(k, inputs)?;
    let data: Vec<&[f32]> = inputs
        .iter()
        .map(|t| t.as_slice::<f32>().ok_or("loop kernel input is not f32"))
        .collect::<Result<_, _>>()?;
    let n = ls.n;
    let mut outs: Vec<Vec<f32>> = (0..k.outputs.len())
        .map(|_| vec![0.0; ls.numel()])
        .collect();
    let n_i64 = i64::try_from(n).map_err(|_| "row too long")?;
    let bases: Vec<RowPtr> = outs.iter_mut().map(|o| RowPtr(o.as_mut_ptr())).collect();
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
                *p = unsafe { b.0.add(row * n) };
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
        .map(|v| Tensor::from_vec(ls.shape.clone(), v))
        .collect())
}
