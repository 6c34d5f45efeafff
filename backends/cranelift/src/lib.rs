//! kiln-cranelift: the JIT CPU backend. [`compile`] partitions an optimised graph
//! ([`kiln_plan::partition`]), JIT-compiles every loop kernel (fused elementwise, broadcast
//! and last-axis reductions) to native code with Cranelift, and runs the plan on the CPU
//! runtime ([`CpuPlan`]), which runs the rest (contractions, other ops) itself.

mod codegen;
mod vmath;

pub use codegen::RowFn;
use cranelift_jit::JITModule;
use kiln_ir::{EvalError, Graph, Tensor};
use kiln_plan::{partition, Kernel, LoopKernel, Plan};
use kiln_runtime::executor::rows::run_rows;
use kiln_runtime::executor::rows::PostMap;
pub use kiln_runtime::executor::rows::{run_row_fn, run_row_fn_par, PAR_MIN_WORK};
use kiln_runtime::executor::{CpuPlan, LoopRunner, ParallelFor, RunReport};
use std::collections::HashMap;

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

/// A compiled loop kernel: its row function, and what the runtime maps over its output
/// after it ([`codegen::split_post`]).
#[derive(Clone, Copy, Debug)]
struct JitRow {
    f: RowFn,
    post: Option<PostMap>,
}

/// A graph compiled for the CPU: JIT row functions for loop kernels, the runtime for the rest.
pub struct JitExecutable {
    plan: CpuPlan,
    /// Runs contractions and splits large loop kernels.
    pool: kiln_runtime::pool::Pool,
    fns: Vec<Option<JitRow>>,
    /// The compiled loop kernels of `loop`/`scan` bodies, per kernel of the plan.
    bodies: Vec<Option<BodyFns>>,
    /// Loop kernels that reused an identical earlier kernel's code.
    reused: usize,
    _code: CodeHolder,
}

/// The row functions of one body plan (and of the bodies nested in it), by kernel.
#[derive(Default)]
struct BodyFns {
    fns: Vec<Option<JitRow>>,
    bodies: Vec<Option<BodyFns>>,
}

/// The function ids a module defined for one plan and its nested bodies.
struct BodyIds {
    ids: Vec<Option<(cranelift_module::FuncId, Option<PostMap>)>>,
    bodies: Vec<Option<BodyIds>>,
}

/// Loop kernels already compiled, by their code-relevant form ([`code_key`]): a kernel
/// that only differs from an earlier one in the graph values it reads and writes (the
/// same norm or epilogue in every layer of a stacked model) reuses its function.
#[derive(Default)]
struct Compiled {
    by_key: HashMap<String, Vec<(LoopKernel, cranelift_module::FuncId)>>,
    reused: usize,
}

/// `k` with its graph values erased: what its generated code depends on (`codegen`
/// reads positions, never value ids).
fn code_key(k: &LoopKernel) -> LoopKernel {
    let mut k = k.clone();
    for i in &mut k.inputs {
        i.value = kiln_ir::ValueId(0);
    }
    for o in &mut k.outputs {
        o.0 = kiln_ir::ValueId(0);
    }
    k
}

/// Defines the loop kernels of `plan` and, recursively, of the bodies `cpu` prepared.
fn define_plan(
    module: &mut JITModule,
    plan: &Plan,
    bodies: &[Option<std::sync::Arc<CpuPlan>>],
    prefix: &str,
    compiled: &mut Compiled,
) -> Result<BodyIds, CompileError> {
    let mut ids = vec![];
    for (i, k) in plan.kernels.iter().enumerate() {
        ids.push(match k {
            Kernel::Loop(l) => {
                let (l, post) = codegen::split_post(l);
                let l = &l;
                let key = code_key(l);
                let text = format!("{key:?}");
                let known = compiled
                    .by_key
                    .get(&text)
                    .and_then(|v| v.iter().find(|(k, _)| *k == key).map(|(_, id)| *id));
                match known {
                    Some(id) => {
                        compiled.reused += 1;
                        Some((id, post))
                    }
                    None => {
                        let id = codegen::define(module, l, &format!("{prefix}loop{i}")).map_err(
                            |msg| CompileError::Codegen {
                                kernel: plan.label(i),
                                msg,
                            },
                        )?;
                        compiled.by_key.entry(text).or_default().push((key, id));
                        Some((id, post))
                    }
                }
            }
            _ => None,
        });
    }
    let mut nested = vec![];
    for (i, b) in bodies.iter().enumerate() {
        nested.push(match b {
            Some(b) => Some(define_plan(
                module,
                &b.plan,
                &b.bodies,
                &format!("{prefix}body{i}_"),
                compiled,
            )?),
            None => None,
        });
    }
    Ok(BodyIds {
        ids,
        bodies: nested,
    })
}

/// The finalised row functions of [`define_plan`]'s ids.
fn finalised(module: &JITModule, ids: BodyIds) -> BodyFns {
    BodyFns {
        fns: ids
            .ids
            .into_iter()
            .map(|id| {
                id.map(|(id, post)| {
                    let p = module.get_finalized_function(id);
                    // SAFETY: `define` gave this function the `RowFn` signature.
                    let f = unsafe { std::mem::transmute::<*const u8, RowFn>(p) };
                    JitRow { f, post }
                })
            })
            .collect(),
        bodies: ids
            .bodies
            .into_iter()
            .map(|b| b.map(|b| finalised(module, b)))
            .collect(),
    }
}

/// Runs a body plan's loop kernels with their compiled row functions.
struct BodyRunner<'a> {
    fns: &'a BodyFns,
    pool: &'a kiln_runtime::pool::Pool,
}

impl LoopRunner for BodyRunner<'_> {
    fn run_loop(
        &self,
        index: usize,
        k: &LoopKernel,
        inputs: &[&Tensor],
        out: &mut kiln_runtime::executor::arena::Outputs,
    ) -> Result<Vec<Tensor>, String> {
        match self.fns.fns.get(index).copied().flatten() {
            Some(r) => run_row_fn_par(r.f, r.post, k, inputs, self.pool, out),
            None => kiln_plan::eval::run_loop(k, inputs),
        }
    }

    fn pool(&self) -> Option<&kiln_runtime::pool::Pool> {
        Some(self.pool)
    }

    fn body_runner(&self, index: usize) -> Option<Box<dyn LoopRunner + '_>> {
        let fns = self.fns.bodies.get(index)?.as_ref()?;
        Some(Box::new(BodyRunner {
            fns,
            pool: self.pool,
        }))
    }

    fn row_fn(&self, index: usize) -> Option<(RowFn, Option<PostMap>)> {
        self.fns
            .fns
            .get(index)
            .copied()
            .flatten()
            .map(|r| (r.f, r.post))
    }
}

impl std::fmt::Debug for JitExecutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitExecutable")
            .field("kernels", &self.plan().kernels.len())
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
    compile_plan(partition(g).map_err(CompileError::Partition)?, opts)
}

/// Compiles a partitioned plan: each loop kernel to native code, the rest prepared by the
/// CPU runtime (contraction weights packed).
pub fn compile_plan(plan: Plan, opts: &JitOptions) -> Result<JitExecutable, CompileError> {
    let threads = if opts.threads == 0 {
        kiln_runtime::native::gemm::physical_cores()
    } else {
        opts.threads
    };
    let mut module = codegen::new_module().map_err(|msg| CompileError::Codegen {
        kernel: "module".into(),
        msg,
    })?;
    // The CPU runtime prepares `loop`/`scan` bodies as plans of their own; their loop
    // kernels are compiled into the same module.
    let cpu = CpuPlan::new(plan);
    let mut compiled = Compiled::default();
    let ids = define_plan(&mut module, &cpu.plan, &cpu.bodies, "", &mut compiled)?;
    module
        .finalize_definitions()
        .map_err(|e| CompileError::Codegen {
            kernel: "module".into(),
            msg: e.to_string(),
        })?;
    let BodyFns { fns, bodies } = finalised(&module, ids);
    let pool = kiln_runtime::pool::Pool::new(threads).map_err(|e| CompileError::Codegen {
        kernel: "thread pool".into(),
        msg: e.to_string(),
    })?;
    Ok(JitExecutable {
        plan: cpu,
        pool,
        fns,
        bodies,
        reused: compiled.reused,
        _code: CodeHolder(module),
    })
}

impl JitExecutable {
    /// The partitioned plan.
    pub fn plan(&self) -> &Plan {
        &self.plan.plan
    }

    /// The plan as the CPU runtime prepared it (packed contractions, run state).
    pub fn cpu_plan(&self) -> &CpuPlan {
        &self.plan
    }

    /// The number of threads kernels use.
    pub fn threads(&self) -> usize {
        self.pool.threads()
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

    /// Loop kernels (bodies' included) that reused the code of an identical earlier one
    /// instead of being compiled again.
    pub fn reused_kernel_count(&self) -> usize {
        self.reused
    }

    /// Runs on inputs given by name; outputs come back in graph order.
    pub fn run_named(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<Tensor>, EvalError> {
        self.plan.run_named(inputs, self)
    }

    /// Runs on inputs in graph order.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EvalError> {
        self.plan.run(inputs, self)
    }

    /// Runs on inputs in graph order that the caller keeps: read in place, never copied
    /// ([`CpuPlan::run_borrowed`]).
    pub fn run_borrowed(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, EvalError> {
        self.plan.run_borrowed(inputs, self, None)
    }

    /// [`JitExecutable::run_borrowed`], timing every kernel and planning memory.
    pub fn run_borrowed_profiled(
        &self,
        inputs: &[&Tensor],
    ) -> Result<(Vec<Tensor>, RunReport), EvalError> {
        let mut report = RunReport::default();
        let outs = self.plan.run_borrowed(inputs, self, Some(&mut report))?;
        Ok((outs, report))
    }
}

impl LoopRunner for JitExecutable {
    fn run_loop(
        &self,
        index: usize,
        k: &LoopKernel,
        inputs: &[&Tensor],
        out: &mut kiln_runtime::executor::arena::Outputs,
    ) -> Result<Vec<Tensor>, String> {
        let Some(r) = self.fns.get(index).copied().flatten() else {
            return kiln_plan::eval::run_loop(k, inputs);
        };
        run_row_fn_par(r.f, r.post, k, inputs, &self.pool, out)
    }

    fn pool(&self) -> Option<&kiln_runtime::pool::Pool> {
        Some(&self.pool)
    }

    fn body_runner(&self, index: usize) -> Option<Box<dyn LoopRunner + '_>> {
        let fns = self.bodies.get(index)?.as_ref()?;
        Some(Box::new(BodyRunner {
            fns,
            pool: &self.pool,
        }))
    }
}

/// One loop kernel compiled on its own (for tests and tools).
pub struct LoopFn {
    f: RowFn,
    post: Option<PostMap>,
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

/// JIT-compiles one loop kernel as [`compile`] does (a root transcendental left to the
/// runtime's vector math where this CPU has AVX2 or AVX-512).
pub fn compile_loop(k: &LoopKernel) -> Result<LoopFn, CompileError> {
    let (code, post) = codegen::split_post(k);
    compile_loop_as(k, &code, post)
}

/// JIT-compiles one loop kernel entirely as Cranelift code (every transcendental inline).
pub fn compile_loop_inline(k: &LoopKernel) -> Result<LoopFn, CompileError> {
    compile_loop_as(k, k, None)
}

fn compile_loop_as(
    k: &LoopKernel,
    code: &LoopKernel,
    post: Option<PostMap>,
) -> Result<LoopFn, CompileError> {
    let err = |msg: String| CompileError::Codegen {
        kernel: "loop".into(),
        msg,
    };
    let mut module = codegen::new_module().map_err(err)?;
    let id = codegen::define(&mut module, code, "loop").map_err(err)?;
    module
        .finalize_definitions()
        .map_err(|e| err(e.to_string()))?;
    let p = module.get_finalized_function(id);
    // SAFETY: `define` gave this function the `RowFn` signature.
    let f = unsafe { std::mem::transmute::<*const u8, RowFn>(p) };
    Ok(LoopFn {
        f,
        post,
        kernel: k.clone(),
        _code: CodeHolder(module),
    })
}

impl LoopFn {
    /// The vector-math function the runtime maps over the output after the compiled code,
    /// if the kernel's root transcendental was left to it.
    pub fn post_map(&self) -> Option<kiln_plan::vmath::Func> {
        self.post.map(|p| p.func)
    }

    /// Runs the kernel on its inputs (one per kernel input), on the calling thread.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        run_row_fn(self.f, self.post, &self.kernel, inputs)
    }

    /// Runs the kernel, splitting rows through `par` whenever there are at least two.
    pub fn run_split(
        &self,
        inputs: &[&Tensor],
        par: &dyn ParallelFor,
    ) -> Result<Vec<Tensor>, String> {
        run_rows(
            self.f,
            self.post,
            &self.kernel,
            inputs,
            par,
            0,
            &mut kiln_runtime::executor::arena::Outputs::none(),
        )
    }
}
