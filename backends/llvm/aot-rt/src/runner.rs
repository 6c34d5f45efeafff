//! Running loop kernels through ahead-of-time compiled row functions (the same
//! `fn(ins, outs, n)` ABI as the Cranelift JIT, run by the runtime's shared row runner), with
//! contractions and large loop kernels split over the context's thread pool.

use kiln_ir::Tensor;
use kiln_plan::LoopKernel;
use kiln_runtime::executor::rows::run_row_fn_par;
use kiln_runtime::executor::LoopRunner;
use kiln_runtime::pool::{Pool, PoolError};

pub use kiln_runtime::executor::rows::RowFn;

/// Runs loop kernel `i` with `fns[i]`, falling back to the portable evaluator where a
/// kernel has no compiled code; owns the context's thread pool.
pub struct AotRunner {
    /// Row function per plan kernel (`None` for non-loop kernels).
    pub fns: Vec<Option<RowFn>>,
    pool: Pool,
}

impl AotRunner {
    /// A runner over `fns` with `threads` workers (0: one per physical core).
    pub fn new(fns: Vec<Option<RowFn>>, threads: usize) -> Result<AotRunner, PoolError> {
        Ok(AotRunner {
            fns,
            pool: Pool::new(resolve(threads))?,
        })
    }

    /// Replaces the pool with one of `threads` workers (0: one per physical core).
    pub fn set_threads(&mut self, threads: usize) -> Result<(), PoolError> {
        let n = resolve(threads);
        if n != self.pool.threads() {
            self.pool = Pool::new(n)?;
        }
        Ok(())
    }

    /// The number of workers.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }
}

fn resolve(threads: usize) -> usize {
    if threads == 0 {
        kiln_runtime::native::gemm::physical_cores()
    } else {
        threads
    }
}

impl LoopRunner for AotRunner {
    fn run_loop(
        &self,
        index: usize,
        k: &LoopKernel,
        inputs: &[&Tensor],
        out: &mut kiln_runtime::executor::arena::Outputs,
    ) -> Result<Vec<Tensor>, String> {
        match self.fns.get(index).copied().flatten() {
            Some(f) => run_row_fn_par(f, None, k, inputs, &self.pool, out),
            None => kiln_plan::eval::run_loop(k, inputs),
        }
    }

    fn pool(&self) -> Option<&Pool> {
        Some(&self.pool)
    }
}
