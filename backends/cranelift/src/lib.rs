//! kiln-cranelift: the JIT CPU backend. [`compile`] partitions an optimised graph with the
//! runtime's kernel layer, JIT-compiles every loop kernel (fused elementwise, broadcast and
//! last-axis reductions) to native code with Cranelift, and runs the rest (contractions,
//! other ops) through the runtime's routines.

mod codegen;

pub use codegen::RowFn;
use cranelift_jit::JITModule;
use kiln_ir::{EvalError, Graph, Tensor};
use kiln_runtime::kernel::{partition, Kernel, LoopKernel, LoopRunner, LoopShape, Plan, RunReport};

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
        run_row_fn(f, k, inputs)
    }

    fn pool(&self) -> Option<&kiln_runtime::pool::Pool> {
        Some(&self.pool)
    }
}

/// Runs a compiled row function over every row of the bound domain.
pub fn run_row_fn(f: RowFn, k: &LoopKernel, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
    let ls = LoopShape::bind(k, inputs)?;
    let data: Vec<&[f32]> = inputs
        .iter()
        .map(|t| t.as_slice::<f32>().ok_or("loop kernel input is not f32"))
        .collect::<Result<_, _>>()?;
    let n = ls.n;
    let mut outs: Vec<Vec<f32>> = vec![vec![0.0; ls.numel()]; k.outputs.len()];
    let mut in_ptrs: Vec<*const f32> = vec![std::ptr::null(); data.len()];
    let mut out_ptrs: Vec<*mut f32> = vec![std::ptr::null_mut(); outs.len()];
    let n_i64 = i64::try_from(n).map_err(|_| "row too long")?;
    ls.for_each_row(|row, offs| {
        for ((p, d), &o) in in_ptrs.iter_mut().zip(&data).zip(offs) {
            // `bind` checked that every row read (o..o+n, or o alone when broadcast)
            // lies inside the input.
            *p = d[o..].as_ptr();
        }
        for (p, o) in out_ptrs.iter_mut().zip(outs.iter_mut()) {
            *p = o[row * n..].as_mut_ptr();
        }
        // SAFETY: pointers cover `n` elements (or one, for broadcast inputs) per `bind`.
        unsafe { f(in_ptrs.as_ptr(), out_ptrs.as_ptr(), n_i64) };
    });
    Ok(outs
        .into_iter()
        .map(|v| Tensor::from_vec(ls.shape.clone(), v))
        .collect())
}
