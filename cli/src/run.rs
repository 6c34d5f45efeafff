//! `kiln run`: run a model on inputs from files (or random ones), write the outputs, or
//! check them against an ONNX test-data folder.

use anyhow::{bail, Context, Result};
use kiln::{Backend, Executable, Model, Options};
use kiln_ir::{DType, Tensor, TensorData};
use kiln_reference::{compare, TestData, MODEL_TOLERANCE};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct RunArgs {
    /// An ONNX file or a text-form `.kir` file.
    model: PathBuf,
    /// An input tensor: NAME=FILE, where FILE is `.npy` or an ONNX TensorProto `.pb`.
    #[arg(long = "input", value_name = "NAME=FILE")]
    inputs: Vec<String>,
    /// Fill inputs that were not given with seeded random values (integers that index a
    /// table within its rows, other integers in [0, 10)).
    #[arg(long)]
    random_inputs: bool,
    /// Size of a symbolic dim for random inputs: NAME=N. Without any, sizes come from the
    /// `bench_inputs` of an export.json beside the model, else every symbolic dim is 1.
    #[arg(long = "dim", value_name = "NAME=N")]
    dims: Vec<String>,
    /// Write each output as DIR/<output name>.npy.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Run on DIR/input_*.pb and compare with DIR/output_*.pb; exit 2 if over tolerance.
    #[arg(long, value_name = "DIR", conflicts_with = "inputs")]
    test_data: Option<PathBuf>,
    /// Optimisation level: 0 runs the graph as imported, 1 runs it through the default
    /// pass pipeline first.
    #[arg(long, value_name = "LEVEL", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    opt: u8,
    /// Which executor runs the model: `jit` (Cranelift JIT with the runtime's kernels) or
    /// `interp` (the reference interpreter).
    #[arg(long, value_name = "BACKEND", default_value = "jit")]
    backend: Backend,
    /// Threads inside kernels (0: one per physical core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    approx: crate::approx::ApproxArgs,
    /// Where to run: `cpu`, or `cuda` / `cuda:N` (an NVIDIA GPU through its driver; the
    /// model is compiled to PTX for the input shapes; without a driver, an error).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: kiln::Device,
}

pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let model = Model::load(&args.model)?;
    let opts = Options {
        threads: args.threads,
        opt_level: args.opt,
        backend: args.backend,
        device: args.device,
        ..Options::default()
    };
    let exe = match crate::approx::apply(&args.approx, &model, &args.model, &opts, &args.dims)? {
        Some((g, report, _)) => {
            println!("{report}");
            model.compile_optimised(g, &opts)?
        }
        None => {
            let line = crate::progress::Line::start("compiling");
            let exe = model.compile_with_progress(&opts, Some(line.callback()))?;
            line.finish();
            exe
        }
    };
    if let Some(dir) = &args.test_data {
        return run_test_data(&exe, dir);
    }
    let mut given: HashMap<String, Tensor> = HashMap::new();
    for spec in &args.inputs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--input `{spec}` should be NAME=FILE"))?;
        if given.contains_key(name) {
            bail!("--input `{name}` is given twice");
        }
        given.insert(name.to_string(), read_tensor(Path::new(file))?);
    }
    let mut dims = crate::random::bind_dims(&args.dims, exe.inputs().iter().map(|v| &v.ty))?;
    if args.dims.is_empty() {
        let ios = exe.inputs().iter().map(|v| (v.name.as_str(), &v.ty));
        dims = crate::random::dims_from_export_json(&args.model, ios);
    }
    let bounds = crate::random::index_bounds(model.graph());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut inputs = Vec::new();
    for v in exe.inputs() {
        let t = match given.remove(&v.name) {
            Some(t) => t,
            None if args.random_inputs => {
                let int_end = bounds
                    .get(&v.name)
                    .copied()
                    .unwrap_or(crate::random::DEFAULT_INT_END);
                random_tensor(&v.ty, &dims, int_end, &mut rng).with_context(|| {
                    format!("making a random value for input `{}` ({})", v.name, v.ty)
                })?
            }
            None => bail!(
                "missing input `{}` ({}); pass --input {}=FILE or --random-inputs",
                v.name,
                v.ty,
                v.name
            ),
        };
        inputs.push((v.name.clone(), t));
    }
    if let Some(extra) = given.keys().next() {
        bail!("the model has no input named `{extra}`");
    }
    let named: Vec<(&str, Tensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let outs = exe.run(&named)?;
    for (o, t) in exe.outputs().iter().zip(&outs) {
        let name = &o.name;
        println!("{name}: {}{:?}", t.dtype(), t.shape());
        if let Some(dir) = &args.output_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(format!("{}.npy", file_safe(name)));
            kiln_frontend::tensor_io::write_npy(&path, t)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_test_data(exe: &Executable, dir: &Path) -> Result<ExitCode> {
    let data = TestData::load(dir)?;
    let named = test_data_inputs(exe, &data, dir)?;
    let outs = exe.run(&named)?;
    if outs.len() != data.outputs.len() {
        bail!(
            "the model gives {} outputs but {} has {}",
            outs.len(),
            dir.display(),
            data.outputs.len()
        );
    }
    let rows = exe.outputs().iter().zip(&outs).zip(&data.outputs);
    Ok(print_errors(
        rows.map(|((o, got), (_, want))| (o.name.as_str(), got, want)),
    ))
}

/// The test-data inputs under the model's input names. Test files are matched to inputs by
/// position, as ONNX's runner does.
pub(crate) fn test_data_inputs<'a>(
    exe: &'a Executable,
    data: &TestData,
    dir: &Path,
) -> Result<Vec<(&'a str, Tensor)>> {
    if data.inputs.len() != exe.inputs().len() {
        bail!(
            "{} has {} inputs but the model takes {}",
            dir.display(),
            data.inputs.len(),
            exe.inputs().len()
        );
    }
    Ok(exe
        .inputs()
        .iter()
        .zip(&data.inputs)
        .map(|(io, (_, t))| (io.name.as_str(), t.clone()))
        .collect())
}

/// Prints max abs/rel error per output against its reference under `MODEL_TOLERANCE`;
/// exit code 2 if any is over.
pub fn print_errors<'a>(rows: impl Iterator<Item = (&'a str, &'a Tensor, &'a Tensor)>) -> ExitCode {
    let mut all_ok = true;
    println!(
        "{:<28} {:<18} {:>12} {:>12}  result",
        "output", "shape", "max abs err", "max rel err"
    );
    for (name, got, want) in rows {
        let e = compare(got, want, MODEL_TOLERANCE);
        all_ok &= e.ok;
        println!(
            "{:<28} {:<18} {:>12.3e} {:>12.3e}  {}",
            name,
            format!("{:?}", got.shape()),
            e.max_abs,
            e.max_rel,
            if e.ok {
                "ok".to_string()
            } else {
                format!("MISMATCH: {}", e.reason.unwrap_or_default())
            }
        );
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

fn read_tensor(path: &Path) -> Result<Tensor> {
    let t = if path.extension().is_some_and(|e| e == "pb") {
        kiln_frontend::tensor_io::read_tensor_pb(path)?.1
    } else {
        kiln_frontend::tensor_io::read_npy(path)?
    };
    Ok(t)
}

pub(crate) fn random_tensor(
    ty: &kiln_ir::TensorType,
    dims: &HashMap<String, usize>,
    int_end: i64,
    rng: &mut impl Rng,
) -> Result<Tensor> {
    let shape = crate::random::input_shape(ty, dims)?;
    let n: usize = shape.iter().product();
    let data = if ty.dtype.is_float() {
        TensorData::from_f64s(ty.dtype, (0..n).map(|_| rng.gen_range(-1.0..1.0)))
    } else if ty.dtype == DType::Bool {
        TensorData::from_i64s(ty.dtype, (0..n).map(|_| 1))
    } else {
        TensorData::from_i64s(ty.dtype, (0..n).map(|_| rng.gen_range(0..int_end)))
    };
    Tensor::new(shape, data).map_err(anyhow::Error::msg)
}

fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
