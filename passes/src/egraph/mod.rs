//! Equality saturation: the graph goes into an e-graph ([`convert`]), the rewrite rules
//! ([`rules`]) grow it under explicit limits, DAG-aware extraction ([`extract`]) picks the
//! cheapest equivalent graph under the cost model ([`cost`]), and it comes back as IR.
//! Every step is visible: the [`EgraphReport`] holds iterations, e-graph size, why the
//! runner stopped, time, and per rule how many of its applications changed the e-graph.
//!
//! Every rule is an exact identity (no approximations), so the optimised graph computes
//! the same function; floating-point results differ only by reassociation rounding.

pub mod analysis;
pub mod convert;
pub mod cost;
pub mod extract;
pub mod lang;
pub mod rules;
pub mod shared;

#[cfg(test)]
mod tests;

use crate::target::Target;
use crate::{Pass, PassError, PassStats};
use analysis::KEGraph;
use cost::CostModel;
use egg::{Rewrite, Runner, StopReason};
use kiln_ir::Graph;
use lang::Kn;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The runner's limits: it stops at whichever is hit first.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Most e-nodes.
    pub nodes: usize,
    /// Most iterations.
    pub iterations: usize,
    /// Most wall time for saturation.
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            nodes: 200_000,
            iterations: 32,
            time: Duration::from_millis(1500),
        }
    }
}

/// What one saturation did, for `kiln inspect` and the pass statistics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EgraphReport {
    /// Iterations run.
    pub iterations: usize,
    /// E-nodes at the end.
    pub enodes: usize,
    /// E-classes at the end.
    pub eclasses: usize,
    /// Why the runner stopped (`saturated`, `node limit 200000`, ...).
    pub stop_reason: String,
    /// Time building the e-graph and saturating.
    pub saturate_time: Duration,
    /// Time extracting and converting back.
    pub extract_time: Duration,
    /// Per rule: applications that changed the e-graph.
    pub hits: BTreeMap<String, usize>,
    /// Estimated seconds of the input graph (extracted from the unsaturated e-graph).
    pub cost_before: f64,
    /// Estimated seconds of the result.
    pub cost_after: f64,
    /// Node count before and after.
    pub nodes_before: usize,
    /// Node count after.
    pub nodes_after: usize,
    /// What was optimised once and replayed on the copies of a stacked block (None when
    /// the graph was saturated whole).
    pub sharing: Option<shared::Sharing>,
}

impl fmt::Display for EgraphReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "e-graph: {} iterations, {} e-nodes, {} e-classes, stopped: {}",
            self.iterations, self.enodes, self.eclasses, self.stop_reason
        )?;
        writeln!(
            f,
            "time: saturate {:.1} ms, extract {:.1} ms; est. cost {:.1} µs -> {:.1} µs; nodes {} -> {}",
            self.saturate_time.as_secs_f64() * 1e3,
            self.extract_time.as_secs_f64() * 1e3,
            self.cost_before * 1e6,
            self.cost_after * 1e6,
            self.nodes_before,
            self.nodes_after
        )?;
        if let Some(s) = &self.sharing {
            write!(f, "{s}")?;
        }
        for (rule, n) in &self.hits {
            writeln!(f, "  {n:6}  {rule}")?;
        }
        Ok(())
    }
}

/// Why saturation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EgraphError {
    /// The graph holds something the e-graph does not take (e.g. subgraphs).
    #[error("not converted to an e-graph: {0}")]
    Unsupported(String),
    /// Extraction or conversion back failed (a bug).
    #[error("extraction: {0}")]
    Extract(String),
}

fn stop_reason(r: &Option<StopReason>) -> String {
    match r {
        Some(StopReason::Saturated) => "saturated".into(),
        Some(StopReason::IterationLimit(n)) => format!("iteration limit {n}"),
        Some(StopReason::NodeLimit(n)) => format!("node limit {n}"),
        Some(StopReason::TimeLimit(t)) => format!("time limit {t:.2} s"),
        Some(StopReason::Other(s)) => s.clone(),
        None => "not run".into(),
    }
}

/// Saturates `g` with `rules` and extracts the cheapest equivalent graph.
pub fn saturate(
    g: &Graph,
    rules: &[Rewrite<Kn, analysis::KilnAnalysis>],
    limits: &Limits,
    cm: &CostModel,
) -> Result<(Graph, EgraphReport), EgraphError> {
    saturate_keep(g, rules, limits, cm).map(|s| (s.graph, s.report))
}

/// A saturation's result with the e-graph and extraction it came from (what replaying it
/// on another copy of a block needs, [`shared`]).
pub(crate) struct Saturated {
    pub graph: Graph,
    pub report: EgraphReport,
    pub egraph: KEGraph,
    pub extraction: extract::Extraction,
    pub origins: convert::Origins,
}

/// [`saturate`], keeping the e-graph.
pub(crate) fn saturate_keep(
    g: &Graph,
    rules: &[Rewrite<Kn, analysis::KilnAnalysis>],
    limits: &Limits,
    cm: &CostModel,
) -> Result<Saturated, EgraphError> {
    let t0 = Instant::now();
    let (eg, origins) = convert::to_egraph(g).map_err(EgraphError::Unsupported)?;
    let cost_before = extract::extract(&eg, &origins.roots, cm, &HashMap::new())
        .map(|e| e.dag_cost)
        .unwrap_or(f64::NAN);
    let runner: Runner<Kn, analysis::KilnAnalysis> = Runner::default()
        .with_egraph(eg)
        .with_node_limit(limits.nodes)
        .with_iter_limit(limits.iterations)
        .with_time_limit(limits.time)
        .run(rules);
    let saturate_time = t0.elapsed();
    let mut hits: BTreeMap<String, usize> = rules.iter().map(|r| (r.name.to_string(), 0)).collect();
    for it in &runner.iterations {
        for (name, n) in &it.applied {
            *hits.entry(name.to_string()).or_default() += n;
        }
    }
    let eg: KEGraph = runner.egraph;
    let t1 = Instant::now();
    let ext =
        extract::extract(&eg, &origins.roots, cm, &HashMap::new()).map_err(EgraphError::Extract)?;
    let out = convert::from_egraph(&eg, &ext, &origins).map_err(EgraphError::Extract)?;
    let report = EgraphReport {
        iterations: runner.iterations.len(),
        enodes: eg.total_number_of_nodes(),
        eclasses: eg.number_of_classes(),
        stop_reason: stop_reason(&runner.stop_reason),
        saturate_time,
        extract_time: t1.elapsed(),
        hits,
        cost_before,
        cost_after: ext.dag_cost,
        nodes_before: g.nodes.len(),
        nodes_after: out.nodes.len(),
        sharing: None,
    };
    Ok(Saturated {
        graph: out,
        report,
        egraph: eg,
        extraction: ext,
        origins,
    })
}

/// The pass: equality saturation with every rule family, for a target.
pub struct SaturateEgraph {
    /// Runner limits.
    pub limits: Limits,
    /// The cost model extraction minimises.
    pub cost: CostModel,
    /// Whether the copies of a stacked block share one saturation ([`shared`]); off, the
    /// graph is saturated whole (what tests compare sharing with).
    pub share: bool,
    /// Whether a shared saturation is replayed on the other copies (on) or every copy is
    /// saturated on its own (off: what tests compare replaying with, bit for bit).
    pub replay: bool,
    last: Mutex<Option<EgraphReport>>,
}

impl Default for SaturateEgraph {
    fn default() -> SaturateEgraph {
        SaturateEgraph::new(Target::default())
    }
}

impl SaturateEgraph {
    /// The pass for a target, with default limits.
    pub fn new(target: Target) -> SaturateEgraph {
        SaturateEgraph::with_cost_model(CostModel::for_extraction(target))
    }

    /// The pass minimising a given cost model (`kiln inspect` passes the one it reports
    /// with, so its symbolic dims bind the same way), with default limits.
    pub fn with_cost_model(cost: CostModel) -> SaturateEgraph {
        SaturateEgraph {
            limits: Limits::default(),
            cost,
            share: true,
            replay: true,
            last: Mutex::new(None),
        }
    }

    /// The pass saturating the graph whole, without sharing between stacked copies.
    pub fn without_sharing(mut self) -> SaturateEgraph {
        self.share = false;
        self
    }

    /// The report of the last run (what `kiln inspect` prints).
    pub fn last_report(&self) -> Option<EgraphReport> {
        self.last.lock().ok().and_then(|l| l.clone())
    }
}

impl Pass for SaturateEgraph {
    fn name(&self) -> &'static str {
        "saturate_egraph"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["egraph"]
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        let rules = rules::all();
        // The copies of a stacked block share one saturation; else the graph is saturated
        // whole.
        let shared = if self.share {
            match shared::saturate_shared(g, &rules, &self.limits, &self.cost, self.replay) {
                Ok(r) => r,
                Err(EgraphError::Unsupported(_)) => None,
                Err(e) => return Err(PassError::graph(self.name(), e)),
            }
        } else {
            None
        };
        let result = match shared {
            Some(r) => Ok(r),
            None => saturate(g, &rules, &self.limits, &self.cost),
        };
        let (out, report) = match result {
            Ok(r) => r,
            // A graph the e-graph does not take is left as it is.
            Err(EgraphError::Unsupported(_)) => return Ok(PassStats::default()),
            Err(e) => return Err(PassError::graph(self.name(), e)),
        };
        let mut stats = PassStats::default();
        // Keep the graph untouched when nothing improved (no churn of names and order).
        // `!(a < b)` also keeps the graph when a cost is NaN.
        let improved = report.cost_after < report.cost_before * (1.0 - 1e-9);
        if !improved {
            if let Ok(mut l) = self.last.lock() {
                *l = Some(report);
            }
            return Ok(stats);
        }
        stats.removed = report.nodes_before.saturating_sub(report.nodes_after);
        stats.added = report.nodes_after.saturating_sub(report.nodes_before);
        stats.changed = report.hits.values().filter(|&&n| n > 0).count();
        for r in &rules {
            let n = report.hits.get(r.name.as_str()).copied().unwrap_or(0);
            stats.bump(r.name.as_str(), n);
        }
        if let Some(s) = &report.sharing {
            for st in &s.stacks {
                stats.bump("shared_copies", st.copies);
                stats.bump("replayed_copies", st.replayed);
            }
        }
        stats.bump("egraph_iterations", report.iterations);
        stats.bump("egraph_enodes", report.enodes);
        stats.bump("egraph_eclasses", report.eclasses);
        *g = out;
        if let Ok(mut l) = self.last.lock() {
            *l = Some(report);
        }
        Ok(stats)
    }
}
