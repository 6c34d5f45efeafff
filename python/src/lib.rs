//! `kiln._kiln`, the native half of kiln's Python package: `compile` → `Executable`
//! (run with numpy feeds, the GIL released), `inspect` (the optimiser's per-pass table)
//! and `build` (an AOT shared library). `kiln/__init__.py` adds the ORT-style
//! `InferenceSession` on top.

mod convert;
mod errors;

use errors::{to_py, InputError, KilnError, ModelError, RunError, UnsupportedOpError};
use kiln::{Backend, Model, Options, Tensor};
use kiln_ir::Dim;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::path::PathBuf;

/// A model given as a path (str or os.PathLike) or as the bytes of an ONNX file or of
/// `.kir` text.
fn load_model(py: Python<'_>, model: &Bound<'_, PyAny>) -> PyResult<Model> {
    if let Ok(b) = model.cast::<PyBytes>() {
        let bytes = b.as_bytes().to_vec();
        return py.detach(move || model_from_bytes(bytes));
    }
    let path: PathBuf = model.extract().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(
            "model must be a path (str or os.PathLike) or the bytes of an ONNX or .kir model",
        )
    })?;
    py.detach(move || Model::load(&path)).map_err(to_py)
}

/// Text form when the bytes are UTF-8 text holding a `func`; an ONNX protobuf otherwise.
fn model_from_bytes(bytes: Vec<u8>) -> PyResult<Model> {
    let graph = match std::str::from_utf8(&bytes) {
        Ok(src) if src.contains("func @") => kiln_ir::text::parse(src)
            .map_err(|e| ModelError::new_err(format!("<bytes>: {}", errors::chain_text(&e))))?,
        _ => kiln_frontend::load_model_bytes(kiln_frontend::Bytes::from(bytes), None)
            .map_err(|e| to_py(kiln::Error::Load(kiln_frontend::LoadError::Onnx(e))))?,
    };
    kiln_ir::verify(&graph).map_err(|e| ModelError::new_err(format!("<bytes>: {e}")))?;
    Ok(Model::from_graph(graph))
}

/// One input or output of a compiled model.
#[pyclass(frozen, module = "kiln", get_all)]
struct TensorInfo {
    /// The name feeds and results use.
    name: String,
    /// numpy dtype name (`float32`, `int64`, ...).
    dtype: String,
    /// Each dim: an int when fixed, its name (str) when symbolic, None when unknown;
    /// None for the whole shape when even the rank is unknown.
    shape: Option<Vec<Py<PyAny>>>,
    /// kiln's own spelling of the type (`f32[batch, 16]`).
    kiln_type: String,
}

#[pymethods]
impl TensorInfo {
    fn __repr__(&self) -> String {
        format!("TensorInfo({}: {})", self.name, self.kiln_type)
    }
}

fn infos(py: Python<'_>, ios: &[kiln::Io]) -> PyResult<Vec<TensorInfo>> {
    ios.iter()
        .map(|io| {
            let shape = match io.ty.shape.dims() {
                None => None,
                Some(dims) => Some(
                    dims.iter()
                        .map(|d| -> PyResult<Py<PyAny>> {
                            Ok(match d {
                                Dim::Fixed(n) => n.into_pyobject(py)?.into_any().unbind(),
                                Dim::Sym(s) => s.into_pyobject(py)?.into_any().unbind(),
                                Dim::Unknown => py.None(),
                            })
                        })
                        .collect::<PyResult<Vec<_>>>()?,
                ),
            };
            Ok(TensorInfo {
                name: io.name.clone(),
                dtype: convert::numpy_name(io.ty.dtype).to_string(),
                shape,
                kiln_type: io.ty.to_string(),
            })
        })
        .collect()
}

/// Converts `feeds` (a mapping name → array-like) into tensors in the order of `ios`.
fn order_feeds(
    py: Python<'_>,
    ios: &[kiln::Io],
    feeds: &Bound<'_, PyAny>,
) -> PyResult<Vec<Tensor>> {
    let feeds = feeds.cast::<PyDict>().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(
            "feeds must be a dict mapping input names to numpy arrays",
        )
    })?;
    let mut slots: Vec<Option<Tensor>> = (0..ios.len()).map(|_| None).collect();
    for (k, v) in feeds.iter() {
        let name: String = k
            .extract()
            .map_err(|_| InputError::new_err("feed names must be strings"))?;
        let Some(i) = ios.iter().position(|io| io.name == name) else {
            let known = ios
                .iter()
                .map(|io| format!("`{}` ({})", io.name, io.ty))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(InputError::new_err(format!(
                "unknown input `{name}`: the model's inputs are {known}"
            )));
        };
        slots[i] = Some(convert::to_tensor(py, &name, &v)?);
    }
    slots
        .into_iter()
        .zip(ios)
        .map(|(t, io)| {
            t.ok_or_else(|| {
                InputError::new_err(format!(
                    "missing input `{}`: the model expects {}",
                    io.name, io.ty
                ))
            })
        })
        .collect()
}

/// A compiled model. Thread-safe: many Python threads may call `run` at once (the GIL is
/// released while kiln runs).
#[pyclass(frozen, module = "kiln")]
struct Executable {
    exe: kiln::Executable,
    /// The inputs and outputs as the model declares them (the optimised graph may know
    /// less about an output's dims).
    declared_inputs: Vec<kiln::Io>,
    declared_outputs: Vec<kiln::Io>,
    output_names: Vec<String>,
    /// What the approximation accepted, when `compile` was given `approx`.
    approx_report: Option<kiln::approx::ApproxReport>,
}

impl Executable {
    /// Converts `feeds` (a mapping name → array-like) into tensors in the model's input order.
    fn ordered_inputs(&self, py: Python<'_>, feeds: &Bound<'_, PyAny>) -> PyResult<Vec<Tensor>> {
        order_feeds(py, self.exe.inputs(), feeds)
    }

    fn run_tensors(&self, py: Python<'_>, inputs: Vec<Tensor>) -> PyResult<Vec<Tensor>> {
        let exe = &self.exe;
        py.detach(move || exe.run_ordered(inputs)).map_err(to_py)
    }
}

#[pymethods]
impl Executable {
    /// The model's inputs, in order.
    #[getter]
    fn inputs(&self, py: Python<'_>) -> PyResult<Vec<TensorInfo>> {
        infos(py, &self.declared_inputs)
    }

    /// The model's outputs, in order.
    #[getter]
    fn outputs(&self, py: Python<'_>) -> PyResult<Vec<TensorInfo>> {
        infos(py, &self.declared_outputs)
    }

    /// What `compile(approx=...)` accepted, or `None` for an exact executable: a dict with
    /// `metric`, `budget`, `source`, `random`, `calibration_sets`, `held_out_sets`,
    /// `accepted` (one dict per rewritten site: `site`, `rewrite`, `params`, `error_alone`,
    /// `error_added`, `est_speedup`), `rejected`, `calibration_error`, `held_out_error`,
    /// `est_speedup` and `text` (the report as the CLI prints it).
    #[getter]
    fn approx_report<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(r) = &self.approx_report else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("metric", r.metric.to_string())?;
        d.set_item("budget", r.budget)?;
        d.set_item("source", &r.source)?;
        d.set_item("random", r.random)?;
        d.set_item("calibration_sets", r.sets.0)?;
        d.set_item("held_out_sets", r.sets.1)?;
        let accepted = PyList::empty(py);
        for a in &r.accepted {
            let row = PyDict::new(py);
            row.set_item("site", &a.candidate.site.name)?;
            row.set_item("rewrite", a.candidate.family)?;
            row.set_item("params", &a.candidate.params)?;
            row.set_item("error_alone", a.error_alone)?;
            row.set_item("error_added", a.error_added)?;
            row.set_item("est_speedup", a.est_speedup)?;
            accepted.append(row)?;
        }
        d.set_item("accepted", accepted)?;
        d.set_item("rejected", r.rejected)?;
        d.set_item("calibration_error", r.calibration_error)?;
        d.set_item("held_out_error", r.held_out_error)?;
        d.set_item("est_speedup", r.est_speedup)?;
        d.set_item("text", r.to_string())?;
        Ok(Some(d))
    }

    /// Seconds `compile` took: optimisation plus code generation.
    #[getter]
    fn compile_time(&self) -> f64 {
        self.exe.compile_time().as_secs_f64()
    }

    /// The optimiser's share of `compile_time`, in seconds.
    #[getter]
    fn optimise_time(&self) -> f64 {
        self.exe.optimise_time().as_secs_f64()
    }

    /// `"jit"`, `"aot"` or `"interp"`.
    #[getter]
    fn backend(&self) -> String {
        self.exe.backend().to_string()
    }

    /// Threads used inside kernels.
    #[getter]
    fn threads(&self) -> usize {
        self.exe.threads()
    }

    /// Runs the model: `feeds` maps every input name to a numpy array (or array-like);
    /// returns a dict of output name → numpy array, in the model's output order.
    fn run<'py>(&self, py: Python<'py>, feeds: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let inputs = self.ordered_inputs(py, feeds)?;
        let outs = self.run_tensors(py, inputs)?;
        let d = PyDict::new(py);
        for (name, t) in self.output_names.iter().zip(outs) {
            d.set_item(name, convert::to_numpy(py, t))?;
        }
        Ok(d)
    }

    /// Runs the model and returns the outputs named in `output_names` (all of them, in
    /// order, when None) as a list: what `InferenceSession.run` returns.
    #[pyo3(signature = (output_names, feeds))]
    fn run_list<'py>(
        &self,
        py: Python<'py>,
        output_names: Option<Vec<String>>,
        feeds: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let picks: Option<Vec<usize>> = match &output_names {
            None => None,
            Some(names) => Some(
                names
                    .iter()
                    .map(|n| {
                        self.output_names
                            .iter()
                            .position(|o| o == n)
                            .ok_or_else(|| {
                                InputError::new_err(format!(
                                    "unknown output `{n}`: the model's outputs are {}",
                                    self.output_names.join(", ")
                                ))
                            })
                    })
                    .collect::<PyResult<_>>()?,
            ),
        };
        let inputs = self.ordered_inputs(py, feeds)?;
        let outs = self.run_tensors(py, inputs)?;
        let list = PyList::empty(py);
        match picks {
            None => {
                for t in outs {
                    list.append(convert::to_numpy(py, t))?;
                }
            }
            Some(picks) => {
                for k in picks {
                    list.append(convert::to_numpy(py, outs[k].clone()))?;
                }
            }
        }
        Ok(list)
    }

    /// Runs `runs` times from Rust with no Python between runs (the feeds converted once)
    /// and returns each run's seconds: the Rust API's own latency, which bench/python.sh
    /// subtracts from `run`'s to get the Python overhead.
    fn _time_rust_runs(
        &self,
        py: Python<'_>,
        feeds: &Bound<'_, PyAny>,
        runs: usize,
    ) -> PyResult<Vec<f64>> {
        let inputs = self.ordered_inputs(py, feeds)?;
        let exe = &self.exe;
        py.detach(move || {
            (0..runs)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    let outs = exe.run_ordered(inputs.clone())?;
                    drop(outs);
                    Ok(t0.elapsed().as_secs_f64())
                })
                .collect::<Result<Vec<f64>, kiln::Error>>()
        })
        .map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!(
            "Executable(backend={}, threads={}, inputs=[{}], outputs=[{}])",
            self.exe.backend(),
            self.exe.threads(),
            self.exe
                .inputs()
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            self.exe
                .outputs()
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

fn options(
    threads: Option<usize>,
    opt_level: u8,
    backend: &str,
    passes: &str,
) -> PyResult<Options> {
    let backend: Backend = backend
        .parse()
        .map_err(pyo3::exceptions::PyValueError::new_err)?;
    if opt_level > 1 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "opt_level must be 0 or 1, got {opt_level}"
        )));
    }
    Ok(Options {
        threads: threads.unwrap_or(0),
        opt_level,
        passes: passes.to_string(),
        backend,
        ..Options::default()
    })
}

/// Loads and compiles a model. `model` is a path or the bytes of an ONNX or `.kir` model.
#[pyfunction]
#[pyo3(signature = (model, threads=None, opt_level=1, backend="jit", passes="", approx=None, max_error=None, calibration=None))]
#[allow(clippy::too_many_arguments)]
fn compile(
    py: Python<'_>,
    model: &Bound<'_, PyAny>,
    threads: Option<usize>,
    opt_level: u8,
    backend: &str,
    passes: &str,
    approx: Option<&Bound<'_, PyAny>>,
    max_error: Option<f64>,
    calibration: Option<&Bound<'_, PyAny>>,
) -> PyResult<Executable> {
    let opts = options(threads, opt_level, backend, passes)?;
    let m = load_model(py, model)?;
    let request = approx_request(py, &m, approx, max_error, calibration)?;
    let (declared_inputs, declared_outputs) = (m.inputs(), m.outputs());
    let (exe, approx_report) = py
        .detach(move || -> Result<_, kiln::Error> {
            let Some((spec, max_error, calib)) = request else {
                return Ok((m.compile(&opts)?, None));
            };
            let req = kiln::approx::Request {
                rewrites: kiln::approx::parse_families(&spec)?,
                max_error,
                metric: kiln::approx::Metric::default(),
            };
            let (g, report) = m.approximate(&opts, &req, &calib)?;
            Ok((m.compile_optimised(g, &opts)?, Some(report)))
        })
        .map_err(to_py)?;
    Ok(Executable {
        declared_inputs,
        declared_outputs,
        output_names: exe.outputs().iter().map(|o| o.name.clone()).collect(),
        exe,
        approx_report,
    })
}

/// `compile`'s approximation arguments checked and gathered: the family spec, the budget and
/// the calibration sets (a folder in ONNX test layout, or a list of feed dicts), or `None`
/// without `approx`. Unlike the CLI, Python never falls back to random calibration inputs.
fn approx_request(
    py: Python<'_>,
    m: &Model,
    approx: Option<&Bound<'_, PyAny>>,
    max_error: Option<f64>,
    calibration: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<(String, f64, kiln::approx::Calibration)>> {
    let value_err = |msg: &str| pyo3::exceptions::PyValueError::new_err(msg.to_string());
    let Some(approx) = approx else {
        if max_error.is_some() || calibration.is_some() {
            return Err(value_err(
                "max_error and calibration apply only with approx=\"FAMILY[=PARAMS],...\" \
                 (e.g. approx=\"ffn-threshold\")",
            ));
        }
        return Ok(None);
    };
    let spec: String = approx
        .extract()
        .map_err(|_| value_err("approx must be a string such as \"ffn-threshold=0.5\""))?;
    let Some(e) = max_error else {
        return Err(value_err(
            "approx needs an error budget: pass max_error (e.g. max_error=1e-2)",
        ));
    };
    if !e.is_finite() || e < 0.0 {
        return Err(value_err(&format!(
            "max_error must be a finite number >= 0, got {e}"
        )));
    }
    let Some(calibration) = calibration else {
        return Err(value_err(
            "approx needs calibration inputs: pass calibration= a folder of test_data_set_* \
             folders (ONNX test layout) or a list of feed dicts {input name: numpy array} \
             that represent real data",
        ));
    };
    let calib = if let Ok(sets) = calibration.cast::<PyList>() {
        let ios = m.inputs();
        let n = sets.len();
        let sets = sets
            .iter()
            .map(|feeds| order_feeds(py, &ios, &feeds))
            .collect::<PyResult<Vec<_>>>()?;
        m.calibration_from_sets(sets, &format!("{n} feed dicts"))
    } else {
        let dir: PathBuf = calibration.extract().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(
                "calibration must be a folder path or a list of feed dicts",
            )
        })?;
        m.calibration_from_dir(&dir)
    }
    .map_err(to_py)?;
    Ok(Some((spec, e, calib)))
}

/// Runs the optimiser pass by pass and returns what it did: a dict with `passes` (one
/// dict per pass: index, name, time_s, nodes_before, nodes_after, changed, removed,
/// added, counters), `skipped`, `rule_hits` (rewrites applied per e-graph rule), `egraph`
/// (its eclasses, enodes and iterations), `ops_before`,
/// `ops_after` and `fused_ops` (kiln-only ops the optimised graph uses, with counts).
#[pyfunction]
#[pyo3(signature = (model, passes=""))]
fn inspect<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    passes: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let m = load_model(py, model)?;
    let spec = passes.to_string();
    let (before, after, report) = py
        .detach(move || -> Result<_, String> {
            let mut pm = kiln_passes::default_pipeline();
            pm.configure(&spec).map_err(|e| e.to_string())?;
            let mut g = m.graph().clone();
            let report = pm.run(&mut g).map_err(|e| errors::chain_text(&e))?;
            Ok((m.graph().op_histogram(), g.op_histogram(), report))
        })
        .map_err(ModelError::new_err)?;
    let d = PyDict::new(py);
    let rows = PyList::empty(py);
    let hits = PyDict::new(py);
    let egraph = PyDict::new(py);
    for p in &report.passes {
        let r = PyDict::new(py);
        r.set_item("index", p.index)?;
        r.set_item("name", p.name)?;
        r.set_item("time_s", p.time.as_secs_f64())?;
        r.set_item("nodes_before", p.nodes_before)?;
        r.set_item("nodes_after", p.nodes_after)?;
        r.set_item("changed", p.stats.changed)?;
        r.set_item("removed", p.stats.removed)?;
        r.set_item("added", p.stats.added)?;
        let c = PyDict::new(py);
        for (k, v) in &p.stats.counters {
            c.set_item(*k, *v)?;
            if p.name == "saturate_egraph" {
                match k.strip_prefix("egraph_") {
                    Some(stat) => egraph.set_item(stat, *v)?,
                    None => hits.set_item(*k, *v)?,
                }
            }
        }
        r.set_item("counters", c)?;
        rows.append(r)?;
    }
    d.set_item("passes", rows)?;
    d.set_item("skipped", report.skipped.to_vec())?;
    d.set_item("total_time_s", report.total_time().as_secs_f64())?;
    d.set_item("rule_hits", hits)?;
    d.set_item("egraph", egraph)?;
    let hist = |h: &[(kiln_ir::OpKind, usize)]| -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (op, n) in h {
            out.set_item(op.name(), *n)?;
        }
        Ok(out)
    };
    d.set_item("ops_before", hist(&before)?)?;
    d.set_item("ops_after", hist(&after)?)?;
    let fused: Vec<_> = after
        .iter()
        .filter(|(op, _)| op.family() == kiln_ir::ops::Family::Fused || op.onnx_name().is_empty())
        .cloned()
        .collect();
    d.set_item("fused_ops", hist(&fused)?)?;
    Ok(d)
}

/// Compiles a model ahead of time into a shared library with a C ABI (as `kiln build`
/// does) and returns a dict: library, header, weights_file, kernels, loop_kernels, cpu.
#[pyfunction]
#[pyo3(signature = (model, output, header=None, weights="embed", target_cpu="native", opt_level=1))]
fn build<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    output: PathBuf,
    header: Option<PathBuf>,
    weights: &str,
    target_cpu: &str,
    opt_level: u8,
) -> PyResult<Bound<'py, PyDict>> {
    let weights = match weights {
        "embed" => kiln_llvm::WeightsMode::Embed,
        "file" => kiln_llvm::WeightsMode::File,
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "weights must be \"embed\" or \"file\", got {other:?}"
            )))
        }
    };
    let opts = options(None, opt_level, "jit", "")?;
    let m = load_model(py, model)?;
    let bopts = kiln_llvm::BuildOptions {
        target_cpu: target_cpu.to_string(),
        weights,
        header: header.clone(),
        runtime: None,
        emit_ir: false,
        approx_report: None,
    };
    let out = output.clone();
    let r = py
        .detach(move || -> Result<_, String> {
            let g = m.optimised(&opts).map_err(|e| errors::chain_text(&e))?;
            kiln_llvm::build_library(&g, &out, &bopts)
                .map_err(|e| format!("building {}: {}", out.display(), errors::chain_text(&e)))
        })
        .map_err(ModelError::new_err)?;
    let d = PyDict::new(py);
    d.set_item("library", r.library.to_string_lossy().to_string())?;
    d.set_item("header", header.map(|h| h.to_string_lossy().to_string()))?;
    d.set_item(
        "weights_file",
        r.weights_file.map(|w| w.to_string_lossy().to_string()),
    )?;
    d.set_item("kernels", r.kernels)?;
    d.set_item("loop_kernels", r.loop_kernels)?;
    d.set_item("cpu", r.cpu)?;
    Ok(d)
}

#[pymodule]
fn _kiln(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(build, m)?)?;
    m.add_class::<Executable>()?;
    m.add_class::<TensorInfo>()?;
    m.add("KilnError", py.get_type::<KilnError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("UnsupportedOpError", py.get_type::<UnsupportedOpError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("RunError", py.get_type::<RunError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
