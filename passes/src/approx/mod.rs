//! Approximate rewrites under an enforced error budget. kiln is exact by default; an
//! approximate rewrite runs only when the user asks for its family (`--approx FAMILY`) and
//! gives a budget (`--max-error E`). This module owns what every family shares:
//!
//! - [`ApproxRewrite`]: a family finds its [`Site`]s in an optimised graph, proposes
//!   [`Candidate`]s per site from the activations it sees on the calibration inputs
//!   ([`Probe`]), and applies one candidate to a graph.
//! - [`approximate`]: runs the exact graph on the calibration inputs, measures the error
//!   every candidate adds on its own ([`Metric`] over every float output), accepts candidates
//!   greedily by estimated saving per unit of error while the whole graph stays within the
//!   budget, then verifies the result on the calibration sets and on the held-out sets, and
//!   refuses ([`ApproxError::Refused`]) when it does not fit.
//! - [`ApproxReport`]: what was accepted (site, rewrite, parameters, error added, estimated
//!   speed-up) and the verified errors, printed by the CLI and shown by `kiln inspect`.
//!
//! Graphs run through an [`Evaluator`]: the reference interpreter ([`Interpreter`]) here,
//! the JIT in the host API.

pub mod attention;
pub mod attn;
pub mod ffn;
mod metric;
pub mod topk;

pub use metric::{measure, Metric};

use crate::cost::CostModel;
use crate::target::Target;
use kiln_ir::{Graph, Tensor, ValueId};
use std::fmt;

/// What can go wrong while approximating.
#[derive(Debug, thiserror::Error)]
pub enum ApproxError {
    /// `--approx` named no known family.
    #[error("unknown approximation family `{name}` (known: {})", known_families().join(", "))]
    UnknownFamily {
        /// What was asked for.
        name: String,
    },
    /// A family's parameter did not parse or is out of range.
    #[error("bad parameter `{param}` for --approx {family}: {why}")]
    BadParam {
        /// The family.
        family: String,
        /// The parameter text.
        param: String,
        /// What is wrong with it.
        why: String,
    },
    /// The budget is negative or not a number.
    #[error("--max-error must be a finite number >= 0, got {0}")]
    BadBudget(f64),
    /// No calibration inputs.
    #[error("no calibration inputs")]
    NoCalibration,
    /// A graph failed to run.
    #[error("running the {which} graph on calibration set {set}: {msg}")]
    Eval {
        /// `exact` or `approximate`.
        which: &'static str,
        /// The calibration set's index.
        set: usize,
        /// The evaluator's message.
        msg: String,
    },
    /// A metric does not apply to the model's outputs.
    #[error("metric {metric}: {why}")]
    Metric {
        /// The metric.
        metric: Metric,
        /// Why not.
        why: String,
    },
    /// The budget could not be met.
    #[error("approximation refused: {why} (budget {budget:.3e}, metric {metric}); the exact model is unchanged — raise --max-error or drop --approx")]
    Refused {
        /// Why.
        why: String,
        /// The budget.
        budget: f64,
        /// The metric.
        metric: Metric,
    },
}

/// The key under which [`approximate`] records its report in the approximate graph's
/// metadata (`Graph::metadata`): a `.kir` written from that graph carries it
/// (`attributes {approx_report = "..."}`), `kiln info` and `kiln inspect` show it, and
/// `kiln build` records it in the library.
pub const REPORT_KEY: &str = "approx_report";

/// The report an approximate graph carries in its metadata ([`REPORT_KEY`]), if any.
pub fn recorded_report(g: &Graph) -> Option<&str> {
    g.metadata.get(REPORT_KEY).map(String::as_str)
}

/// The families `--approx` knows, by name.
pub fn known_families() -> Vec<&'static str> {
    vec![
        ffn::THRESHOLD,
        topk::TOPK,
        attn::ATTN_THRESHOLD,
        attention::LINEAR_ATTENTION,
    ]
}

/// Parses `--approx`'s `FAMILY[=PARAMS],...` into rewrites.
pub fn parse_families(spec: &str) -> Result<Vec<Box<dyn ApproxRewrite>>, ApproxError> {
    let mut out: Vec<Box<dyn ApproxRewrite>> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, param) = match item.split_once('=') {
            Some((n, p)) => (n.trim(), Some(p.trim())),
            None => (item, None),
        };
        match name {
            ffn::THRESHOLD => out.push(Box::new(ffn::FfnThreshold::parse(param)?)),
            topk::TOPK => out.push(Box::new(topk::FfnTopK::parse(param)?)),
            attn::ATTN_THRESHOLD => out.push(Box::new(attn::AttnThreshold::parse(param)?)),
            attention::LINEAR_ATTENTION => {
                out.push(Box::new(attention::LinearAttentionApprox::parse(param)?))
            }
            _ => {
                return Err(ApproxError::UnknownFamily {
                    name: name.to_string(),
                })
            }
        }
    }
    if out.is_empty() {
        return Err(ApproxError::UnknownFamily {
            name: spec.to_string(),
        });
    }
    Ok(out)
}

/// Runs a graph on positional inputs.
pub trait Evaluator {
    /// The graph's outputs on `inputs` (in graph-input order).
    fn run(&self, g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, String>;
}

/// The reference interpreter as an [`Evaluator`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Interpreter;

impl Evaluator for Interpreter {
    fn run(&self, g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        kiln_ir::run(g, inputs.to_vec()).map_err(|e| e.to_string())
    }
}

/// Calibration inputs: sets of graph inputs, split into calibration and held-out sets.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// Sets used to calibrate and accept.
    pub calibrate: Vec<Vec<Tensor>>,
    /// Sets held back for the final verification (may be empty: then the report says so).
    pub held_out: Vec<Vec<Tensor>>,
    /// Where they came from (a folder, or "random").
    pub source: String,
    /// Seeded random inputs, not real data.
    pub random: bool,
}

impl Calibration {
    /// Splits `sets`: the last third (at least one when there are two or more) is held out.
    pub fn split(mut sets: Vec<Vec<Tensor>>, source: &str, random: bool) -> Calibration {
        let held = if sets.len() >= 2 {
            sets.len().div_ceil(3)
        } else {
            0
        };
        let held_out = sets.split_off(sets.len() - held);
        Calibration {
            calibrate: sets,
            held_out,
            source: source.to_string(),
            random,
        }
    }
}

/// A place in a graph one family can rewrite.
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    /// The node the rewrite is anchored at (index in the graph it was found in).
    pub node: usize,
    /// A readable name: the anchor's output value (`%ffn_down`).
    pub name: String,
    /// The value whose activations the family calibrates on.
    pub probe: ValueId,
}

/// One way to rewrite one site.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The family's name.
    pub family: &'static str,
    /// The site.
    pub site: Site,
    /// Readable parameters (`sparsity=0.50 threshold=0.0123`).
    pub params: String,
    /// The family's numeric parameters (meaning up to the family).
    pub values: Vec<f64>,
    /// Estimated seconds saved per run (cost model).
    pub saving: f64,
}

/// Activations of the probed values, per site, over the calibration sets.
pub struct Probe<'a> {
    /// One tensor per calibration set.
    pub values: &'a [Tensor],
    /// The cost model.
    pub cost: &'a CostModel,
}

/// A family of approximate rewrites.
pub trait ApproxRewrite {
    /// `--approx` name.
    fn family(&self) -> &'static str;
    /// The sites in `g` (an optimised graph).
    fn sites(&self, g: &Graph) -> Vec<Site>;
    /// Candidates for `site` from its calibration activations.
    fn candidates(&self, g: &Graph, site: &Site, probe: &Probe<'_>) -> Vec<Candidate>;
    /// Applies `c` to `g` (which still has `c.site.node` where [`ApproxRewrite::sites`]
    /// found it: candidates are applied from the last node to the first).
    fn apply(&self, g: &mut Graph, c: &Candidate);
}

/// What was asked: the rewrites, the budget, the metric.
pub struct Request {
    /// The families.
    pub rewrites: Vec<Box<dyn ApproxRewrite>>,
    /// The error budget.
    pub max_error: f64,
    /// How error is measured.
    pub metric: Metric,
}

/// One accepted rewrite.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    /// The candidate.
    pub candidate: Candidate,
    /// Its error alone on the calibration sets.
    pub error_alone: f64,
    /// What accepting it added to the whole graph's calibration error.
    pub error_added: f64,
    /// Estimated speed-up of the whole graph from this site alone (cost model).
    pub est_speedup: f64,
}

/// The outcome of [`approximate`].
#[derive(Clone, Debug, PartialEq)]
pub struct ApproxReport {
    /// The metric.
    pub metric: Metric,
    /// The budget.
    pub budget: f64,
    /// Where the calibration inputs came from.
    pub source: String,
    /// Whether they were seeded random values.
    pub random: bool,
    /// Calibration and held-out set counts.
    pub sets: (usize, usize),
    /// Accepted rewrites, in acceptance order.
    pub accepted: Vec<Accepted>,
    /// Candidates tried and rejected (error alone over budget, or the sum over it).
    pub rejected: usize,
    /// The approximate graph's error on the calibration sets.
    pub calibration_error: f64,
    /// Its error on the held-out sets (`None` without held-out sets).
    pub held_out_error: Option<f64>,
    /// Estimated speed-up of the whole graph (cost model).
    pub est_speedup: f64,
    /// Measured speed-up, when a benchmark measured it.
    pub measured_speedup: Option<f64>,
}

impl fmt::Display for ApproxReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "approximation: metric {}, budget {:.3e}, calibration {} ({} sets, {} held out){}",
            self.metric,
            self.budget,
            self.source,
            self.sets.0,
            self.sets.1,
            if self.random { " [RANDOM INPUTS]" } else { "" }
        )?;
        writeln!(
            f,
            "  {:<28} {:<14} {:<36} {:>11} {:>9}",
            "site", "rewrite", "params", "error added", "est. x"
        )?;
        for a in &self.accepted {
            writeln!(
                f,
                "  {:<28} {:<14} {:<36} {:>11.3e} {:>9.3}",
                a.candidate.site.name,
                a.candidate.family,
                a.candidate.params,
                a.error_added,
                a.est_speedup
            )?;
        }
        let held = match self.held_out_error {
            Some(e) => format!("{e:.3e}"),
            None => "n/a (one calibration set: nothing held out)".into(),
        };
        write!(
            f,
            "  accepted {} ({} rejected); error on calibration {:.3e}, held out {held}; est. speed-up {:.3}x, measured {}",
            self.accepted.len(),
            self.rejected,
            self.calibration_error,
            self.est_speedup,
            match self.measured_speedup {
                Some(s) => format!("{s:.3}x"),
                None => "n/a (kiln bench measures it)".into(),
            }
        )
    }
}

/// Runs `g` on every set; the outputs per set.
fn run_sets(
    eval: &dyn Evaluator,
    g: &Graph,
    sets: &[Vec<Tensor>],
    which: &'static str,
) -> Result<Vec<Vec<Tensor>>, ApproxError> {
    sets.iter()
        .enumerate()
        .map(|(i, s)| {
            eval.run(g, s)
                .map_err(|msg| ApproxError::Eval { which, set: i, msg })
        })
        .collect()
}

/// The error of `g` against the exact outputs `want` on `sets` (worst set).
fn error_of(
    eval: &dyn Evaluator,
    g: &Graph,
    sets: &[Vec<Tensor>],
    want: &[Vec<Tensor>],
    names: &[String],
    metric: Metric,
) -> Result<f64, ApproxError> {
    let got = run_sets(eval, g, sets, "approximate")?;
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        let e = measure(metric, g, w, names).map_err(|why| ApproxError::Metric { metric, why })?;
        worst = if e.is_nan() {
            f64::INFINITY
        } else {
            worst.max(e)
        };
    }
    Ok(worst)
}

/// Applies the rewrites of `req` to `g` under the budget, as the module documentation
/// describes. Returns the approximate graph and its report, or [`ApproxError::Refused`].
pub fn approximate(
    g: &Graph,
    req: &Request,
    calib: &Calibration,
    eval: &dyn Evaluator,
    target: Target,
) -> Result<(Graph, ApproxReport), ApproxError> {
    let (budget, metric) = (req.max_error, req.metric);
    if !budget.is_finite() || budget < 0.0 {
        return Err(ApproxError::BadBudget(budget));
    }
    if calib.calibrate.is_empty() {
        return Err(ApproxError::NoCalibration);
    }
    let names: Vec<String> = g.outputs.iter().map(|&v| g.value(v).name.clone()).collect();
    let want = run_sets(eval, g, &calib.calibrate, "exact")?;
    // A metric that cannot apply (top1 without logits) fails here, before any work.
    for w in &want {
        measure(metric, w, w, &names).map_err(|why| ApproxError::Metric { metric, why })?;
    }
    let cost = &bound_cost_model(g, &calib.calibrate[0], target);
    let total = cost.graph_cost(g).time.max(f64::MIN_POSITIVE);

    // Sites and their activations: one run with every probed value as an extra output.
    let mut found: Vec<(usize, Site)> = Vec::new();
    for (r, rw) in req.rewrites.iter().enumerate() {
        found.extend(rw.sites(g).into_iter().map(|s| (r, s)));
    }
    let mut probed = g.clone();
    probed.outputs.extend(found.iter().map(|(_, s)| s.probe));
    let acts = run_sets(eval, &probed, &calib.calibrate, "exact")?;
    let n_out = g.outputs.len();
    let mut cands: Vec<(usize, Candidate, f64)> = Vec::new();
    let mut rejected = 0;
    let mut proposed = 0;
    // The smallest error alone per site (NaN as infinite), for a refusal's message.
    let mut best: Vec<(String, f64, String)> = Vec::new();
    for (j, (r, site)) in found.iter().enumerate() {
        let values: Vec<Tensor> = acts.iter().map(|o| o[n_out + j].clone()).collect();
        let probe = Probe {
            values: &values,
            cost,
        };
        for c in req.rewrites[*r].candidates(g, site, &probe) {
            proposed += 1;
            let mut trial = g.clone();
            req.rewrites[*r].apply(&mut trial, &c);
            let e = error_of(eval, &trial, &calib.calibrate, &want, &names, metric)?;
            let ek = if e.is_nan() { f64::INFINITY } else { e };
            match best.iter_mut().find(|b| b.0 == site.name) {
                Some(b) if b.1 <= ek => {}
                Some(b) => *b = (site.name.clone(), ek, c.params.clone()),
                None => best.push((site.name.clone(), ek, c.params.clone())),
            }
            if e <= budget {
                cands.push((*r, c, e));
            } else {
                rejected += 1;
            }
        }
    }
    // Greedy: most estimated saving per unit of error first; one candidate per site.
    cands.sort_by(|a, b| {
        let ra = a.1.saving / a.2.max(1e-12);
        let rb = b.1.saving / b.2.max(1e-12);
        rb.total_cmp(&ra)
    });
    let mut chosen: Vec<(usize, Candidate, f64, f64)> = Vec::new();
    let mut current_error = 0.0;
    let mut current = g.clone();
    for (r, c, alone) in cands {
        if chosen.iter().any(|(_, d, _, _)| d.site == c.site) {
            continue;
        }
        let mut set: Vec<(usize, Candidate)> =
            chosen.iter().map(|(r, c, _, _)| (*r, c.clone())).collect();
        set.push((r, c.clone()));
        let trial = apply_all(g, &req.rewrites, &set);
        let e = error_of(eval, &trial, &calib.calibrate, &want, &names, metric)?;
        if e <= budget {
            chosen.push((r, c, alone, e - current_error));
            current_error = e;
            current = trial;
        } else {
            rejected += 1;
        }
    }
    if chosen.is_empty() {
        let why = if found.is_empty() {
            "the model has no site for the requested families".to_string()
        } else if proposed == 0 {
            format!(
                "no candidate at the {} sites would run faster at these shapes by the cost model (ffn-threshold, ffn-topk, attn-threshold: the CPU runtime skips zeros only below a measured density, `kiln_passes::approx::ffn::RUNTIME_MAX_DENSITY`; linear-attention: the linear form wins only on long sequences)",
                found.len()
            )
        } else {
            let per_site: Vec<String> = best
                .iter()
                .map(|(site, e, params)| format!("{site} {e:.3e} ({params})"))
                .collect();
            format!(
                "none of {} candidates at {} sites fits the budget on the calibration sets \
                 (smallest error alone per site: {})",
                rejected,
                found.len(),
                per_site.join("; ")
            )
        };
        return Err(ApproxError::Refused {
            why,
            budget,
            metric,
        });
    }
    // Verification: the whole approximate graph, on calibration and held-out sets.
    let calibration_error = error_of(eval, &current, &calib.calibrate, &want, &names, metric)?;
    let held_out_error = if calib.held_out.is_empty() {
        None
    } else {
        let want_h = run_sets(eval, g, &calib.held_out, "exact")?;
        Some(error_of(
            eval,
            &current,
            &calib.held_out,
            &want_h,
            &names,
            metric,
        )?)
    };
    let worst = calibration_error.max(held_out_error.unwrap_or(0.0));
    if worst.is_nan() || worst > budget {
        return Err(ApproxError::Refused {
            why: format!(
                "the approximate graph's error is {calibration_error:.3e} on the calibration sets and {} on the held-out sets",
                held_out_error.map_or("n/a".into(), |e| format!("{e:.3e}"))
            ),
            budget,
            metric,
        });
    }
    let saved: f64 = chosen.iter().map(|(_, c, _, _)| c.saving).sum();
    let accepted = chosen
        .into_iter()
        .map(|(_, c, alone, added)| Accepted {
            est_speedup: total / (total - c.saving).max(f64::MIN_POSITIVE),
            candidate: c,
            error_alone: alone,
            error_added: added,
        })
        .collect();
    let report = ApproxReport {
        metric,
        budget,
        source: calib.source.clone(),
        random: calib.random,
        sets: (calib.calibrate.len(), calib.held_out.len()),
        accepted,
        rejected,
        calibration_error,
        held_out_error,
        est_speedup: total / (total - saved).max(f64::MIN_POSITIVE),
        measured_speedup: None,
    };
    current
        .metadata
        .insert(REPORT_KEY.to_string(), report.to_string());
    Ok((current, report))
}

/// A cost model whose symbolic dims take their sizes from one set of inputs.
fn bound_cost_model(g: &Graph, inputs: &[Tensor], target: Target) -> CostModel {
    let mut cm = CostModel::new(target);
    for (&v, t) in g.inputs.iter().zip(inputs) {
        if let Some(dims) = g.ty(v).shape.dims() {
            for (d, &size) in dims.iter().zip(t.shape()) {
                if let kiln_ir::Dim::Sym(name) = d {
                    cm = cm.bind(name, size as u64);
                }
            }
        }
    }
    cm
}

/// `g` with every candidate of `set` applied, last anchor node first (so earlier node
/// indices stay valid while nodes are inserted).
fn apply_all(g: &Graph, rewrites: &[Box<dyn ApproxRewrite>], set: &[(usize, Candidate)]) -> Graph {
    let mut order: Vec<&(usize, Candidate)> = set.iter().collect();
    order.sort_by_key(|c| std::cmp::Reverse(c.1.site.node));
    let mut out = g.clone();
    for (r, c) in order {
        rewrites[*r].apply(&mut out, c);
    }
    out
}

#[cfg(test)]
mod tests;
