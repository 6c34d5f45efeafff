//! `kiln compare`: run a model as imported and as optimised by the default pipeline on the
//! same seeded random inputs, and print the largest absolute and relative difference per
//! output. Exit 2 when an output differs by more than the model tolerance.

use anyhow::{bail, Context, Result};
use kiln::{Backend, Model, Options};
use kiln_ir::{DType, Dim, Graph, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct CompareArgs {
    /// An ONNX file or a text-form `.kir` file.
    model: PathBuf,
    /// Seed of the random inputs.
    #[arg(long, value_name = "N", default_value_t = 0)]
    random_inputs_seed: u64,
    /// Size of a symbolic dim: NAME=N. Input shapes otherwise come from the model's
    /// export.json `bench_inputs` when there is one, else every symbolic dim is 1.
    #[arg(long = "dim", value_name = "NAME=N")]
    dims: Vec<String>,
    /// Turn passes of the optimised run on and off: `-name` off, `+name` on.
    #[arg(
        long,
        value_name = "SPEC",
        default_value = "",
        allow_hyphen_values = true
    )]
    passes: String,
}

pub fn compare_cmd(args: &CompareArgs) -> Result<ExitCode> {
    let model = Model::load(&args.model)?;
    let g = model.graph();
    // Both graphs run on the reference interpreter: the difference is the optimiser's.
    let interp = |opt_level| Options {
        opt_level,
        passes: args.passes.clone(),
        backend: Backend::Interp,
        ..Options::default()
    };
    let unopt = model.compile(&interp(0))?;
    let line = crate::progress::Line::start("compiling");
    let optimised = model
        .compile_with_progress(&interp(1), Some(line.callback()))
        .context("optimising the graph")?;
    line.finish();
    let opt = optimised.graph();
    let inputs = random_inputs(&args.model, g, &args.dims, args.random_inputs_seed)?;
    let named: Vec<(&str, Tensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let want = unopt.run(&named).context("running the unoptimised graph")?;
    let got = optimised
        .run(&named)
        .context("running the optimised graph")?;
    println!(
        "unoptimised {} nodes, optimised {} nodes, random inputs seed {}",
        g.nodes.len(),
        opt.nodes.len(),
        args.random_inputs_seed
    );
    let rows = g.outputs.iter().zip(&got).zip(&want);
    Ok(crate::run::print_errors(rows.map(|((&o, got), want)| {
        (g.value(o).name.as_str(), got, want)
    })))
}

/// Seeded random values for every graph input. Floats are uniform in [-1, 1); integer
/// inputs named like masks are all ones, like token types all zeros, and others (ids) are
/// in [0, 10), so embeddings and masks stay in range.
fn random_inputs(
    model: &Path,
    g: &Graph,
    dim_specs: &[String],
    seed: u64,
) -> Result<Vec<(String, Tensor)>> {
    let bench = model
        .parent()
        .map(|d| d.join("export.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|s| crate::inspect::bench_inputs(&s))
        .unwrap_or_default();
    let dims = crate::random::bind_dims(dim_specs, g.inputs.iter().map(|&i| g.ty(i)))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![];
    for &i in &g.inputs {
        let v = g.value(i);
        let Some(ds) = v.ty.shape.dims() else {
            bail!("input `{}` has an unknown rank", v.name);
        };
        let shape: Vec<usize> = match bench.get(&v.name) {
            Some(b) if dims.is_empty() && b.len() == ds.len() => {
                b.iter().map(|&n| n as usize).collect()
            }
            _ => ds
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n as usize,
                    Dim::Sym(s) => dims.get(s).copied().unwrap_or(1),
                    Dim::Unknown => 1,
                })
                .collect(),
        };
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .with_context(|| format!("input `{}` is too large", v.name))?;
        kiln_ir::limits::check(n, v.ty.dtype.size().max(8), &shape)
            .map_err(|m| anyhow::anyhow!("input `{}` ({}): {m}", v.name, v.ty))?;
        let lname = v.name.to_lowercase();
        let dt = v.ty.dtype;
        let data = if dt.is_float() {
            TensorData::from_f64s(dt, (0..n).map(|_| rng.gen_range(-1.0..1.0)))
        } else if dt == DType::Bool || lname.contains("mask") {
            TensorData::from_i64s(dt, (0..n).map(|_| 1))
        } else if lname.contains("type") {
            TensorData::from_i64s(dt, (0..n).map(|_| 0))
        } else {
            TensorData::from_i64s(dt, (0..n).map(|_| rng.gen_range(0..10)))
        };
        let t = Tensor::new(shape, data).map_err(anyhow::Error::msg)?;
        out.push((v.name.clone(), t));
    }
    Ok(out)
}
