//! `--approx FAMILY[=PARAMS],... --max-error E [--calibration DIR] [--metric M]`, shared by
//! `kiln run`, `kiln bench` and `kiln inspect`: argument checks, calibration inputs (an ONNX
//! test-data folder, or seeded random ones with a loud warning), the call into the budget
//! machinery (`kiln_passes::approx`), the measured speed-up, and the per-layer activation
//! density of sparse-input FFN layers.

use anyhow::{bail, Context, Result};
use kiln::approx::{self, ApproxReport, Calibration, Metric, Request};
use kiln::{Model, Options, Tensor};
use kiln_ir::Graph;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Seeded random calibration sets used when no `--calibration` folder is given (the last
/// two are held out).
pub const RANDOM_SETS: usize = 6;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ApproxArgs {
    /// Opt in to approximate rewrites, comma-separated FAMILY[=PARAMS]:
    /// `ffn-threshold[=SPARSITY]` (magnitude thresholds on FFN down-projection inputs of
    /// SiLU/GELU models; without SPARSITY the budget picks per layer),
    /// `ffn-topk[=FRACTION]` (the same inputs keep the FRACTION of largest magnitudes in
    /// every row; without FRACTION the budget picks per layer),
    /// `linear-attention[=FEATURES|poly|poly:R|hybrid|hybrid:W]` (softmax attention as
    /// linear attention through FAVOR+ random features, FEATURES of them, or the
    /// second-order Taylor polynomial kernel, its queries and keys projected to width R
    /// first when given; without a parameter the budget picks among FAVOR+ with D, 2D or 4D
    /// features and the polynomial kernel at width D, 32 and 16; `hybrid` keeps the W most
    /// recent keys exact, W in 16, 32, 64 unless given, causal attention only). Needs
    /// --max-error.
    #[arg(long, value_name = "FAMILY[=PARAMS],...")]
    pub approx: Option<String>,
    /// The error budget for --approx, measured by --metric on every output against the
    /// exact model; the approximation is refused (exit 1) when it cannot be met.
    #[arg(long, value_name = "E", allow_negative_numbers = true)]
    pub max_error: Option<f64>,
    /// Calibration inputs: a folder of `test_data_set_*` folders (ONNX test layout) or one
    /// such folder. Without it, seeded random inputs (which do not represent real data).
    #[arg(long, value_name = "DIR")]
    pub calibration: Option<PathBuf>,
    /// How --max-error is measured: rel-l2 (default), max-rel, or top1 (fraction of rows of
    /// logits-like outputs whose arg-max changes).
    #[arg(long, value_name = "METRIC", default_value = "rel-l2")]
    pub metric: String,
}

impl ApproxArgs {
    /// The request, or `None` without `--approx`; argument errors name the flag.
    pub fn request(&self) -> Result<Option<Request>> {
        let metric: Metric = self
            .metric
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--metric: {e}"))?;
        let Some(spec) = &self.approx else {
            if self.max_error.is_some() {
                bail!("--max-error is given without --approx: name the approximate rewrites to apply (e.g. --approx {})", approx::ffn::THRESHOLD);
            }
            return Ok(None);
        };
        let Some(e) = self.max_error else {
            bail!("--approx needs an error budget: add --max-error E (e.g. --max-error 1e-2)");
        };
        if !e.is_finite() || e < 0.0 {
            bail!("--max-error must be a finite number >= 0, got {e}");
        }
        let rewrites = approx::parse_families(spec)?;
        Ok(Some(Request {
            rewrites,
            max_error: e,
            metric,
        }))
    }
}

/// The calibration sets for `model`: from `--calibration`, else seeded random ones (with
/// the warning printed on stderr).
pub fn calibration(
    args: &ApproxArgs,
    model: &Model,
    model_path: &Path,
    dims: &[String],
) -> Result<Calibration> {
    match &args.calibration {
        Some(dir) => Ok(model.calibration_from_dir(dir)?),
        None => {
            eprintln!(
                "warning: no --calibration folder: calibrating on {RANDOM_SETS} sets of SEEDED RANDOM inputs.\n\
                 warning: random inputs do not represent real activations; the accepted error may not hold on real data.\n\
                 warning: pass --calibration DIR with test_data_set_* folders of representative inputs."
            );
            let sets = random_sets(model, model_path, dims, RANDOM_SETS)?;
            Ok(Calibration::split(sets, "random (seeded)", true))
        }
    }
}

/// `n` sets of seeded random inputs (dims from `--dim`, else the export.json beside the
/// model, else 1).
pub fn random_sets(
    model: &Model,
    model_path: &Path,
    dims: &[String],
    n: usize,
) -> Result<Vec<Vec<Tensor>>> {
    let ios = model.inputs();
    let mut bound = crate::random::bind_dims(dims, ios.iter().map(|io| &io.ty))?;
    if dims.is_empty() {
        bound = crate::random::dims_from_export_json(
            model_path,
            ios.iter().map(|io| (io.name.as_str(), &io.ty)),
        );
    }
    let bounds = crate::random::index_bounds(model.graph());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    (0..n)
        .map(|_| {
            ios.iter()
                .map(|io| {
                    let end = bounds
                        .get(&io.name)
                        .copied()
                        .unwrap_or(crate::random::DEFAULT_INT_END);
                    crate::run::random_tensor(&io.ty, &bound, end, &mut rng)
                        .with_context(|| format!("making a random value for input `{}`", io.name))
                })
                .collect()
        })
        .collect()
}

/// With `--approx`: the approximate graph and its report (printed to stdout), or the
/// refusal as an error (exit 1). `None` without `--approx`.
pub fn apply(
    args: &ApproxArgs,
    model: &Model,
    model_path: &Path,
    opts: &Options,
    dims: &[String],
) -> Result<Option<(Graph, ApproxReport, Calibration)>> {
    let Some(req) = args.request()? else {
        return Ok(None);
    };
    let calib = calibration(args, model, model_path, dims)?;
    let (g, report) = model.approximate(opts, &req, &calib)?;
    Ok(Some((g, report, calib)))
}

/// Median wall time of `runs` runs of the exact and the approximate executables on the
/// first calibration set; the exact over the approximate time.
pub fn measure_speedup(
    exact: &kiln::Executable,
    approx: &kiln::Executable,
    inputs: &[Tensor],
    runs: usize,
) -> Result<f64> {
    let time = |exe: &kiln::Executable| -> Result<f64> {
        exe.run_ordered(inputs.to_vec())?;
        let mut ts: Vec<f64> = (0..runs.max(1))
            .map(|_| {
                let s = Instant::now();
                exe.run_ordered(inputs.to_vec())
                    .map(|_| s.elapsed().as_secs_f64())
            })
            .collect::<Result<_, _>>()?;
        ts.sort_by(f64::total_cmp);
        Ok(ts[ts.len() / 2])
    };
    Ok(time(exact)? / time(approx)?.max(1e-12))
}

/// The per-layer activation density of the FFN layers the runtime runs with a
/// sparse-input GEMM (inputs made by ReLU or by an approximate threshold), measured on the
/// calibration sets: `(layer, mean density, min, max)`.
pub fn ffn_densities(g: &Graph, sets: &[Vec<Tensor>]) -> Result<Vec<(String, f64, f64, f64)>> {
    let sites = approx::ffn::sparse_input_sites(g);
    if sites.is_empty() || sets.is_empty() {
        return Ok(vec![]);
    }
    let mut probed = g.clone();
    let n_out = g.outputs.len();
    probed.outputs.extend(sites.iter().map(|s| s.probe));
    let mut per: Vec<Vec<f64>> = vec![vec![]; sites.len()];
    let exe = Model::from_graph(probed.clone()).compile_optimised(probed, &Options::default())?;
    for set in sets {
        let outs = exe
            .run_ordered(set.clone())
            .context("measuring activation density")?;
        for (j, t) in outs[n_out..].iter().enumerate() {
            per[j].push(approx::ffn::density(t));
        }
    }
    Ok(sites
        .iter()
        .zip(per)
        .map(|(s, d)| {
            let mean = d.iter().sum::<f64>() / d.len() as f64;
            let min = d.iter().copied().fold(f64::INFINITY, f64::min);
            let max = d.iter().copied().fold(0.0, f64::max);
            (s.name.clone(), mean, min, max)
        })
        .collect())
}

/// The density table as text lines.
pub fn density_lines(rows: &[(String, f64, f64, f64)], source: &str) -> Vec<String> {
    let mut lines = vec![format!(
        "FFN activation density (non-zero fraction of the down-projection input; calibration {source}):"
    )];
    if rows.is_empty() {
        lines.push(
            "  no sparse-input FFN layers (ReLU or thresholded) in the optimised graph".into(),
        );
    }
    for (name, mean, min, max) in rows {
        lines.push(format!(
            "  {name:<32} {:>6.1}%  (min {:.1}%, max {:.1}%)",
            mean * 100.0,
            min * 100.0,
            max * 100.0
        ));
    }
    lines
}
