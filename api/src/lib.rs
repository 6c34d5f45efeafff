//! kiln's host API: load a model, compile it once for a backend, run it from many threads.
//!
//! ```no_run
//! # fn main() -> Result<(), kiln::Error> {
//! let model = kiln::Model::load("examples/mlp/model.onnx")?;
//! let exe = model.compile(&kiln::Options::default())?;
//! let x = kiln::Tensor::from_vec(vec![2, 16], vec![0.5f32; 32]);
//! let outs = exe.run(&[("x", x)])?;
//! println!("{:?}", outs[0].shape());
//! # Ok(())
//! # }
//! ```
//!
//! [`Model`] is kiln's one model type: every CLI command goes through it. This crate and the
//! CLI are the only ones that depend on a backend; the IR, the optimiser, the plan and the
//! CPU runtime know nothing of Cranelift or LLVM.

use kiln_cranelift::{JitExecutable, JitOptions};
use kiln_ir::interp::EvalError;
use kiln_ir::{Dim, Graph};
pub use kiln_passes::approx;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use kiln_ir::{DType, Shape, Tensor, TensorType};
pub use kiln_plan::MemoryPlan;
pub use kiln_runtime::executor::{KernelTime, RunReport};

mod aot;
mod calibration;
#[cfg(feature = "cuda")]
mod cuda;

/// Which executor runs the compiled model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The Cranelift JIT with the CPU runtime's GEMM and kernels (the fast path).
    #[default]
    Jit,
    /// An ahead-of-time shared library built by LLVM (as `kiln build` makes it), loaded
    /// with dlopen. Runs of one executable take turns (the library's context is not
    /// shared between threads). Needs the `aot` feature (on by default).
    Aot,
    /// The reference interpreter: slow, defines what every op means.
    Interp,
}

impl Backend {
    /// Every backend, in the order the CLI lists them.
    pub const ALL: [Backend; 3] = [Backend::Jit, Backend::Aot, Backend::Interp];
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        Backend::ALL
            .into_iter()
            .find(|b| b.to_string() == s)
            .ok_or_else(|| format!("unknown backend `{s}` (expected jit, aot or interp)"))
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Jit => "jit",
            Backend::Aot => "aot",
            Backend::Interp => "interp",
        })
    }
}

/// Where the compiled model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The host CPU, through [`Options::backend`].
    #[default]
    Cpu,
    /// CUDA GPU `n` (needs the `cuda` feature, on by default, and an NVIDIA driver at run
    /// time). The model is specialised to each set of input shapes it runs with (PTX made
    /// and loaded on the first run of each); [`Options::backend`] is not used.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (expected cpu, cuda or cuda:N)")),
        }
    }
}

/// How to compile a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Threads inside kernels; 0 means one per physical core. The interpreter ignores it.
    pub threads: usize,
    /// 0 compiles the graph as imported; 1 (the default) runs the default pass pipeline.
    pub opt_level: u8,
    /// Pass toggles applied to the default pipeline, as `kiln inspect --passes` takes them:
    /// `"-saturate_egraph,-fuse_attention"`. Empty keeps every pass.
    pub passes: String,
    /// Which executor runs the model (on [`Device::Cpu`]).
    pub backend: Backend,
    /// Where the model runs.
    pub device: Device,
    /// Compile the one-token recurrent step of a causal linear-attention or retention
    /// model ([`kiln_passes::decode_step`]): sequence length 1, a `state.<i>.S` (and
    /// `state.<i>.z`) input per `linear_attention` op and the matching `state_out.<i>.*`
    /// outputs after the model's own; zeros are the start. Needs `opt_level` 1.
    pub decode_step: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            threads: 0,
            opt_level: 1,
            passes: String::new(),
            backend: Backend::Jit,
            device: Device::Cpu,
            decode_step: false,
        }
    }
}

/// A step of [`Model::compile_with_progress`], reported as it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Optimisation pass `index` of `total` (1-based) starts.
    Pass {
        /// 1-based position among the passes that run.
        index: usize,
        /// How many passes run.
        total: usize,
        /// The pass's name.
        name: &'static str,
    },
    /// Code generation for `backend` starts.
    Codegen {
        /// The backend.
        backend: Backend,
    },
}

/// A callback told of each [`Phase`] as it starts.
pub type Progress = Arc<dyn Fn(Phase) + Send + Sync>;

/// Everything that can go wrong between a model file and its outputs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read, imported or verified.
    #[error(transparent)]
    Load(#[from] kiln_frontend::LoadError),
    /// The optimiser failed or a pass toggle named no pass.
    #[error("optimising the graph (opt_level 0 skips it): {0}")]
    Optimise(#[from] kiln_passes::ManagerError),
    /// The model has no recurrent decode step (`Options::decode_step`).
    #[error(transparent)]
    DecodeStep(#[from] kiln_passes::decode_step::DecodeStepError),
    /// The backend could not compile the graph.
    #[error("compiling for the {backend} backend: {msg}")]
    Compile {
        /// The backend.
        backend: Backend,
        /// The backend's message.
        msg: String,
    },
    /// An input the model takes was not given.
    #[error("missing input `{name}`: the model expects {expected}")]
    MissingInput {
        /// The input's name.
        name: String,
        /// Its declared type, e.g. `i64[batch, seq]`.
        expected: String,
    },
    /// An input was given under a name the model does not have.
    #[error("unknown input `{name}`: the model's inputs are {known}")]
    UnknownInput {
        /// The given name.
        name: String,
        /// The model's inputs with their types.
        known: String,
    },
    /// An input was given twice.
    #[error("input `{name}` is given twice")]
    DuplicateInput {
        /// The input's name.
        name: String,
    },
    /// An input has the wrong dtype or shape.
    #[error("input `{name}`: expected {expected}, got {got}: {why}")]
    BadInput {
        /// The input's name.
        name: String,
        /// Its declared type.
        expected: String,
        /// The dtype and shape passed.
        got: String,
        /// What does not fit.
        why: String,
    },
    /// The device could not be opened (no driver, no such GPU), or compiling or running
    /// on it failed.
    #[error("device {device}: {msg}")]
    Device {
        /// The device.
        device: Device,
        /// What went wrong.
        msg: String,
    },
    /// Running failed inside the model.
    #[error(transparent)]
    Run(#[from] EvalError),
    /// Calibration inputs could not be read or do not fit the model's inputs.
    #[error("calibration inputs {origin}: {msg}")]
    Calibration {
        /// The folder, or what the sets were called.
        origin: String,
        /// What is wrong.
        msg: String,
    },
    /// An approximation request was bad, or refused under its error budget.
    #[error(transparent)]
    Approx(#[from] kiln_passes::approx::ApproxError),
}

/// A model input or output: its name and declared (possibly symbolic) type.
#[derive(Clone, Debug, PartialEq)]
pub struct Io {
    /// The name inputs are passed under and outputs are reported by.
    pub name: String,
    /// Dtype and shape; symbolic dims are named (`batch`), equal names are equal sizes.
    pub ty: TensorType,
}

impl std::fmt::Display for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.ty)
    }
}

fn ios(g: &Graph, ids: &[kiln_ir::ValueId]) -> Vec<Io> {
    ids.iter()
        .map(|&i| Io {
            name: g.value(i).name.clone(),
            ty: g.value(i).ty.clone(),
        })
        .collect()
}

/// A loaded, verified model, not yet compiled.
#[derive(Clone, Debug)]
pub struct Model {
    graph: Graph,
}

impl Model {
    /// Loads an ONNX file, or kiln's text form when the extension is `.kir`.
    pub fn load(path: impl AsRef<Path>) -> Result<Model, Error> {
        Ok(Model::from_graph(kiln_frontend::load(path)?))
    }

    /// Wraps a graph built in memory (it should verify).
    pub fn from_graph(graph: Graph) -> Model {
        Model { graph }
    }

    /// The graph as loaded.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The model's inputs in graph order.
    pub fn inputs(&self) -> Vec<Io> {
        ios(&self.graph, &self.graph.inputs)
    }

    /// The model's outputs in graph order.
    pub fn outputs(&self) -> Vec<Io> {
        ios(&self.graph, &self.graph.outputs)
    }

    /// The graph after the pass pipeline `opts` selects (as imported when `opt_level` is 0):
    /// what [`Model::compile`] and the AOT builder compile.
    pub fn optimised(&self, opts: &Options) -> Result<Graph, Error> {
        self.optimised_with_progress(opts, None)
    }

    /// [`Model::optimised`], telling `progress` of each pass as it starts.
    pub fn optimised_with_progress(
        &self,
        opts: &Options,
        progress: Option<Progress>,
    ) -> Result<Graph, Error> {
        let mut graph = self.graph.clone();
        if opts.opt_level >= 1 {
            let mut pm = kiln_passes::default_pipeline();
            pm.configure(&opts.passes)?;
            if let Some(p) = progress {
                pm.on_pass(Box::new(move |index, total, name| {
                    p(Phase::Pass { index, total, name })
                }));
            }
            pm.run(&mut graph)?;
        }
        if opts.decode_step {
            if opts.opt_level == 0 {
                return Err(kiln_passes::decode_step::DecodeStepError::Sequence(
                    "the decode step is made from the optimised graph (opt_level 1)".into(),
                )
                .into());
            }
            let full = graph.clone();
            let report = kiln_passes::decode_step::decode_step(&mut graph)?;
            kiln_passes::decode_step::check_against_prefix(&full, &graph, &report)?;
        }
        Ok(graph)
    }

    /// Optimises (unless `opt_level` is 0) and compiles for `opts.backend`.
    pub fn compile(&self, opts: &Options) -> Result<Executable, Error> {
        self.compile_with_progress(opts, None)
    }

    /// [`Model::compile`], telling `progress` of each phase (pass by pass, then code
    /// generation) as it starts.
    pub fn compile_with_progress(
        &self,
        opts: &Options,
        progress: Option<Progress>,
    ) -> Result<Executable, Error> {
        if let Device::Cuda(i) = opts.device {
            if opts.decode_step {
                return Err(Error::Device {
                    device: opts.device,
                    msg: "the decode step (Options::decode_step) compiles for the CPU only".into(),
                });
            }
            // The GPU backend specialises the graph to each input-shape set and optimises
            // it then; it takes the model as imported.
            return self.compile_for_gpu(opts, i);
        }
        let start = Instant::now();
        let graph = self.optimised_with_progress(opts, progress.clone())?;
        let optimise_time = start.elapsed();
        if let Some(p) = &progress {
            p(Phase::Codegen {
                backend: opts.backend,
            });
        }
        compile_graph(graph, opts, start, optimise_time)
    }

    /// Optimises like [`Model::optimised`], then applies the approximate rewrites of `req`
    /// under its error budget ([`kiln_passes::approx::approximate`]), every candidate graph
    /// measured on `calib` by the JIT with `opts.threads` threads. Errors with
    /// [`kiln_passes::approx::ApproxError::Refused`] when the budget cannot be met.
    pub fn approximate(
        &self,
        opts: &Options,
        req: &approx::Request,
        calib: &approx::Calibration,
    ) -> Result<(Graph, approx::ApproxReport), Error> {
        let graph = self.optimised(opts)?;
        let eval = JitEvaluator {
            threads: opts.threads,
        };
        Ok(approx::approximate(
            &graph,
            req,
            calib,
            &eval,
            kiln_passes::target::Target::host(),
        )?)
    }

    /// Compiles an already optimised graph (from [`Model::approximate`]) for
    /// `opts.backend`; `opts.opt_level` and `opts.passes` are not applied again.
    pub fn compile_optimised(&self, graph: Graph, opts: &Options) -> Result<Executable, Error> {
        if let Device::Cuda(_) = opts.device {
            return Err(Error::Device {
                device: opts.device,
                msg: "approximate graphs run on the CPU only so far".into(),
            });
        }
        compile_graph(graph, opts, Instant::now(), Duration::ZERO)
    }

    /// An executable on GPU `i` (`opts.device` is `Device::Cuda(i)`).
    #[cfg(feature = "cuda")]
    fn compile_for_gpu(&self, opts: &Options, i: usize) -> Result<Executable, Error> {
        let start = Instant::now();
        let inner = Inner::Cuda(Box::new(cuda::Cuda::open(&self.graph, opts, i)?));
        let graph = self.graph.clone();
        Ok(Executable {
            inputs: ios(&graph, &graph.inputs),
            outputs: ios(&graph, &graph.outputs),
            graph,
            inner,
            backend: opts.backend,
            device: opts.device,
            optimise_time: Duration::ZERO,
            compile_time: start.elapsed(),
        })
    }

    /// Without the `cuda` feature there is no GPU backend.
    #[cfg(not(feature = "cuda"))]
    fn compile_for_gpu(&self, _opts: &Options, i: usize) -> Result<Executable, Error> {
        Err(Error::Device {
            device: Device::Cuda(i),
            msg: "this build of kiln has no GPU support (the `cuda` feature)".into(),
        })
    }
}

/// The JIT as the approximation machinery's evaluator.
struct JitEvaluator {
    threads: usize,
}

impl approx::Evaluator for JitEvaluator {
    fn run(&self, g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let exe = kiln_cranelift::compile_with(
            g,
            &JitOptions {
                threads: self.threads,
            },
        )
        .map_err(|e| e.to_string())?;
        exe.run(inputs.to_vec()).map_err(|e| e.to_string())
    }
}

fn compile_graph(
    graph: Graph,
    opts: &Options,
    start: Instant,
    optimise_time: Duration,
) -> Result<Executable, Error> {
    let inner = match opts.backend {
        Backend::Jit => Inner::Jit(Box::new(
            kiln_cranelift::compile_with(
                &graph,
                &JitOptions {
                    threads: opts.threads,
                },
            )
            .map_err(|e| Error::Compile {
                backend: Backend::Jit,
                msg: e.to_string(),
            })?,
        )),
        Backend::Aot => Inner::Aot(Box::new(aot::Aot::build(&graph, opts.threads)?)),
        Backend::Interp => Inner::Interp,
    };
    Ok(Executable {
        inputs: ios(&graph, &graph.inputs),
        outputs: ios(&graph, &graph.outputs),
        graph,
        inner,
        backend: opts.backend,
        device: opts.device,
        optimise_time,
        compile_time: start.elapsed(),
    })
}

enum Inner {
    Jit(Box<JitExecutable>),
    Aot(Box<aot::Aot>),
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::Cuda>),
    Interp,
}

/// A compiled model. It is `Send + Sync`: compile once, then call [`Executable::run`] from
/// any number of threads at once.
pub struct Executable {
    graph: Graph,
    inner: Inner,
    inputs: Vec<Io>,
    outputs: Vec<Io>,
    backend: Backend,
    device: Device,
    optimise_time: Duration,
    compile_time: Duration,
}

// Hosts share one executable between threads; keep that true as backends change.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Executable>();
    assert_send_sync::<Model>();
};

impl std::fmt::Debug for Executable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executable")
            .field("backend", &self.backend)
            .field("threads", &self.threads())
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl Executable {
    /// Runs on inputs given by name (any order); outputs come back in [`Executable::outputs`]
    /// order. Every input is checked against its declared dtype and shape first.
    pub fn run(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<Tensor>, Error> {
        let refs = self.order(inputs)?;
        match &self.inner {
            // The JIT reads the caller's tensors where they are (no copy per run).
            Inner::Jit(j) => {
                check_inputs(&self.inputs, &refs)?;
                Ok(j.run_borrowed(&refs)?)
            }
            _ => self.run_ordered(refs.into_iter().cloned().collect()),
        }
    }

    /// Runs on inputs in [`Executable::inputs`] order.
    pub fn run_ordered(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        self.check(&inputs)?;
        Ok(match &self.inner {
            Inner::Jit(j) => j.run(inputs)?,
            Inner::Aot(a) => a.run(&inputs)?,
            #[cfg(feature = "cuda")]
            Inner::Cuda(c) => c.run(inputs)?,
            Inner::Interp => kiln_ir::run(&self.graph, inputs)?,
        })
    }

    /// Runs like [`Executable::run`] and also reports per-kernel wall times and the memory
    /// plan. The interpreter reports one `interpreter` entry for the whole run and no plan.
    pub fn run_profiled(
        &self,
        inputs: &[(&str, Tensor)],
    ) -> Result<(Vec<Tensor>, RunReport), Error> {
        let refs = self.order(inputs)?;
        check_inputs(&self.inputs, &refs)?;
        // The JIT reads the caller's tensors in place; the other backends take copies.
        let ordered = || refs.iter().map(|&t| t.clone()).collect::<Vec<Tensor>>();
        Ok(match &self.inner {
            Inner::Jit(j) => j.run_borrowed_profiled(&refs)?,
            Inner::Aot(a) => {
                let (outs, kernels) = a.run_profiled(&ordered())?;
                let report = RunReport {
                    kernels,
                    ..RunReport::default()
                };
                (outs, report)
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda(c) => {
                let start = Instant::now();
                let outs = c.run(ordered())?;
                let report = RunReport {
                    kernels: vec![KernelTime {
                        label: c.describe(),
                        kind: "cuda",
                        op: "whole run".into(),
                        nanos: start.elapsed().as_nanos() as u64,
                    }],
                    memory: MemoryPlan::default(),
                    ..RunReport::default()
                };
                (outs, report)
            }
            Inner::Interp => {
                let start = Instant::now();
                let outs = kiln_ir::run(&self.graph, ordered())?;
                let report = RunReport {
                    kernels: vec![KernelTime {
                        label: "interpreter".into(),
                        kind: "fallback",
                        op: "interpreter".into(),
                        nanos: start.elapsed().as_nanos() as u64,
                    }],
                    memory: MemoryPlan::default(),
                    ..RunReport::default()
                };
                (outs, report)
            }
        })
    }

    /// The inputs, in the order [`Executable::run_ordered`] takes them.
    pub fn inputs(&self) -> &[Io] {
        &self.inputs
    }

    /// The outputs, in the order runs return them.
    pub fn outputs(&self) -> &[Io] {
        &self.outputs
    }

    /// The backend that runs this executable.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Where the executable runs.
    pub fn device(&self) -> Device {
        self.device
    }

    /// For [`Device::Cuda`]: the ops the last-made GPU program runs on the host, with
    /// counts (empty on the CPU).
    pub fn host_ops(&self) -> Vec<(String, usize)> {
        match &self.inner {
            #[cfg(feature = "cuda")]
            Inner::Cuda(c) => c.host_ops(),
            _ => vec![],
        }
    }

    /// Threads used inside kernels (1 for the interpreter).
    pub fn threads(&self) -> usize {
        match &self.inner {
            Inner::Jit(j) => j.threads(),
            Inner::Aot(a) => a.threads(),
            #[cfg(feature = "cuda")]
            Inner::Cuda(_) => 1,
            Inner::Interp => 1,
        }
    }

    /// Wall time of [`Model::compile`]: optimisation plus code generation.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// The optimiser's share of [`Executable::compile_time`].
    pub fn optimise_time(&self) -> Duration {
        self.optimise_time
    }

    /// The graph that runs (after the optimiser).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// How many kernels the backend compiled to native code and how many the plan has in
    /// all (`None` for the interpreter).
    pub fn kernel_counts(&self) -> Option<(usize, usize)> {
        match &self.inner {
            Inner::Jit(j) => Some((j.jit_kernel_count(), j.plan().kernels.len())),
            Inner::Aot(a) => Some(a.kernel_counts()),
            #[cfg(feature = "cuda")]
            Inner::Cuda(_) => None,
            Inner::Interp => None,
        }
    }

    /// Puts named inputs into graph order (borrowed): unknown, duplicate or missing names
    /// are errors.
    fn order<'t>(&self, inputs: &'t [(&str, Tensor)]) -> Result<Vec<&'t Tensor>, Error> {
        let mut slots: Vec<Option<&Tensor>> = vec![None; self.inputs.len()];
        for (name, t) in inputs {
            let Some(k) = self.inputs.iter().position(|io| io.name == *name) else {
                return Err(Error::UnknownInput {
                    name: name.to_string(),
                    known: describe_inputs(&self.inputs),
                });
            };
            if slots[k].replace(t).is_some() {
                return Err(Error::DuplicateInput {
                    name: name.to_string(),
                });
            }
        }
        slots
            .into_iter()
            .zip(&self.inputs)
            .map(|(t, io)| {
                t.ok_or_else(|| Error::MissingInput {
                    name: io.name.clone(),
                    expected: io.ty.to_string(),
                })
            })
            .collect()
    }

    fn check(&self, inputs: &[Tensor]) -> Result<(), Error> {
        check_inputs(&self.inputs, inputs)
    }
}

fn describe_inputs(ios: &[Io]) -> String {
    ios.iter()
        .map(|io| format!("`{}` ({})", io.name, io.ty))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks inputs in graph order against the declared `ios`, saying what differs; a
/// symbolic dim must have one size across all inputs.
pub(crate) fn check_inputs<T: std::borrow::Borrow<Tensor>>(
    ios: &[Io],
    inputs: &[T],
) -> Result<(), Error> {
    if inputs.len() > ios.len() {
        return Err(Error::UnknownInput {
            name: format!("#{}", ios.len()),
            known: describe_inputs(ios),
        });
    }
    if let Some(io) = ios.get(inputs.len()) {
        return Err(Error::MissingInput {
            name: io.name.clone(),
            expected: io.ty.to_string(),
        });
    }
    // Symbolic dim name -> (size, the input that bound it).
    let mut bound: HashMap<&str, (usize, &str)> = HashMap::new();
    for (io, t) in ios.iter().zip(inputs) {
        let t: &Tensor = t.borrow();
        let bad = |why: String| Error::BadInput {
            name: io.name.clone(),
            expected: io.ty.to_string(),
            got: format!("{}{:?}", t.dtype(), t.shape()),
            why,
        };
        if t.dtype() != io.ty.dtype {
            return Err(bad(format!(
                "dtype is {}, the model takes {}",
                t.dtype(),
                io.ty.dtype
            )));
        }
        let Some(dims) = io.ty.shape.dims() else {
            continue;
        };
        if dims.len() != t.shape().len() {
            return Err(bad(format!(
                "rank is {}, the model takes rank {}",
                t.shape().len(),
                dims.len()
            )));
        }
        for (axis, (d, &n)) in dims.iter().zip(t.shape()).enumerate() {
            match d {
                Dim::Fixed(want) if *want as usize != n => {
                    return Err(bad(format!("dim {axis} is {n}, the model takes {want}")))
                }
                Dim::Sym(s) => match bound.get(s.as_str()) {
                    Some(&(size, by)) if size != n => {
                        return Err(bad(format!(
                            "dim {axis} (`{s}`) is {n}, but input `{by}` set `{s}` = {size}"
                        )))
                    }
                    Some(_) => {}
                    None => {
                        bound.insert(s, (n, &io.name));
                    }
                },
                _ => {}
            }
        }
    }
    Ok(())
}
