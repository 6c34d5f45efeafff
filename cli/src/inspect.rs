//! `kiln inspect`: run the optimisation pipeline pass by pass and show what each pass did
//! (node counts, op histogram changes, estimated FLOPs, bytes and time from
//! `kiln_passes::cost`), the e-graph's statistics, and for every fused op which original
//! ONNX nodes it absorbed. Optionally dumps each pass's graph, writes Graphviz DOT of the
//! result, and writes a self-contained HTML report with both graphs drawn.

use crate::report::{self, view};
use anyhow::{bail, Context, Result};
use kiln_ir::{Dim, Graph};
use kiln_passes::cost::{Cost, CostModel};
use kiln_passes::egraph::{EgraphReport, SaturateEgraph};
use kiln_passes::{Pass, PassStats};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// An ONNX file or a text-form `.kir` file.
    model: PathBuf,
    /// Write the graph before and after every pass as DIR/NN.<pass>.{before,after}.kir
    /// (with --approx also DIR/approximate.kir, which carries the approximation report).
    #[arg(long, value_name = "DIR")]
    dump_dir: Option<PathBuf>,
    /// Write a self-contained HTML report (graphs before and after, tables).
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Write Graphviz DOT of the optimised graph to FILE, or to stdout (instead of the
    /// tables) when no FILE is given.
    #[arg(long, value_name = "FILE", num_args = 0..=1, require_equals = true)]
    dot: Option<Option<PathBuf>>,
    /// Turn passes on and off: `-name` off, `+name` on (comma-separated).
    #[arg(
        long,
        value_name = "SPEC",
        default_value = "",
        allow_hyphen_values = true
    )]
    passes: String,
    /// Run only the first N enabled passes.
    #[arg(long, value_name = "N")]
    stop_after: Option<usize>,
    /// Size of a symbolic dim for the cost model: NAME=N. Defaults come from the model's
    /// export.json `bench_inputs` when there is one, else 1.
    #[arg(long = "dim", value_name = "NAME=N")]
    dims: Vec<String>,
    #[command(flatten)]
    approx: crate::approx::ApproxArgs,
}

/// One row of the per-pass table.
struct Row {
    index: usize,
    name: &'static str,
    time: Duration,
    nodes: (usize, usize),
    cost: Cost,
    changes: String,
    stats: PassStats,
}

pub fn inspect(args: &InspectArgs) -> Result<()> {
    let model = kiln::Model::load(&args.model)?;
    let mut original = model.graph().clone();
    // As the pass manager does: every value carries the freshest inferred type.
    let _ = kiln_ir::infer_types(&mut original);
    let cm = cost_model(&args.model, &original, &args.dims)?;

    // The pass manager decides which passes are on (by name, as `--passes` says); the
    // passes then run here one at a time so every intermediate graph can be measured.
    let mut pm = kiln_passes::default_pipeline();
    pm.configure(&args.passes)?;
    let enabled: HashSet<&str> = pm.enabled_names().into_iter().collect();
    if let Some(dir) = &args.dump_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut g = original.clone();
    let mut rows: Vec<Row> = vec![];
    let mut skipped: Vec<&str> = vec![];
    let mut egraph: Option<(EgraphReport, bool)> = None;
    let line = crate::progress::Line::start("inspecting");
    let total = pm
        .enabled_names()
        .len()
        .min(args.stop_after.unwrap_or(usize::MAX));
    for pass in kiln_passes::default_passes() {
        let name = pass.name();
        let index = rows.len() + 1;
        if !enabled.contains(name) || args.stop_after.is_some_and(|n| index > n) {
            skipped.push(name);
            continue;
        }
        line.set(format!("optimising {index}/{total} {name}"));
        let before_hist = histogram(&g);
        let nodes_before = g.nodes.len();
        dump(&args.dump_dir, &g, index, name, "before")?;
        let start = Instant::now();
        // The e-graph pass runs from an instance kept here, to read its report afterwards.
        // It extracts under the same cost model the table reports (same dims bound;
        // unbound ones at the extraction default).
        let saturate = SaturateEgraph::with_cost_model(
            cm.clone()
                .with_default_dim(kiln_passes::cost::EXTRACTION_DEFAULT_DIM),
        );
        let pass: &dyn Pass = if name == EGRAPH_PASS {
            &saturate
        } else {
            pass.as_ref()
        };
        let stats = run_pass(pass, &mut g).with_context(|| format!("pass #{index} {name}"))?;
        let time = start.elapsed();
        dump(&args.dump_dir, &g, index, name, "after")?;
        kiln_ir::verify(&g).map_err(|e| {
            anyhow::anyhow!(
                "the graph does not verify after pass #{index} {name} (a bug in {name}): {e}"
            )
        })?;
        let _ = kiln_ir::infer_types(&mut g);
        if name == EGRAPH_PASS {
            egraph = saturate.last_report().map(|r| (r, stats.is_noop()));
        }
        rows.push(Row {
            index,
            name,
            time,
            nodes: (nodes_before, g.nodes.len()),
            cost: cm.graph_cost(&g),
            changes: diff(&before_hist, &histogram(&g)),
            stats,
        });
    }

    line.finish();
    if let Some(Some(path)) = &args.dot {
        std::fs::write(path, view::to_dot(&g))
            .with_context(|| format!("writing {}", path.display()))?;
    } else if args.dot.is_some() {
        print!("{}", view::to_dot(&g));
        return Ok(());
    }

    let table = table(&cm.graph_cost(&original), original.nodes.len(), &rows);
    let cost_note = cost_note(&cm);
    println!("model: {} (graph @{})", args.model.display(), original.name);
    println!("{cost_note}");
    print_table(&table);
    if !skipped.is_empty() {
        println!("(skipped: {})", skipped.join(", "));
    }
    let egraph_text = egraph_text(egraph.as_ref());
    println!("\n{egraph_text}");
    let fused = fused_ops(&g);
    println!("\nfused ops: {}", fused.len());
    for (op, out, from) in &fused {
        println!("  {op} %{out} <- {} nodes: {}", from.len(), from.join(", "));
    }
    for line in linear_attention_forms(&cm, &g) {
        println!("{line}");
    }
    for line in recurrence_forms(&cm, &g) {
        println!("{line}");
    }
    let approx_text = approx_section(args, &model, &g)?;
    if !approx_text.is_empty() {
        println!("\n{approx_text}");
    }

    if let Some(path) = &args.html {
        let page = report::html(&report::Report {
            model: args.model.display().to_string(),
            cost_note,
            table,
            egraph: egraph_text,
            fused,
            approx: approx_text,
            before: &original,
            after: &g,
        });
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// With `--calibration`: the measured activation density of each sparse-input FFN layer of
/// the optimised graph `g`; with `--approx`: the approximation report and the densities of
/// the approximate graph. Empty without either.
fn approx_section(args: &InspectArgs, model: &kiln::Model, g: &Graph) -> Result<String> {
    let a = &args.approx;
    let req = a.request()?;
    // A model loaded from a `.kir` written from an approximate graph carries its report.
    let recorded = kiln::approx::recorded_report(model.graph()).map(|r| {
        format!("the model was made by approximate rewrites (report recorded in it):\n{r}")
    });
    if a.calibration.is_none() && req.is_none() {
        return Ok(recorded.unwrap_or_default());
    }
    let calib = crate::approx::calibration(a, model, &args.model, &args.dims)?;
    let all: Vec<Vec<kiln::Tensor>> = calib
        .calibrate
        .iter()
        .chain(&calib.held_out)
        .cloned()
        .collect();
    let mut lines: Vec<String> = recorded.into_iter().collect();
    lines.extend(crate::approx::density_lines(
        &crate::approx::ffn_densities(g, &all)?,
        &calib.source,
    ));
    if let Some(req) = req {
        let opts = kiln::Options {
            passes: args.passes.clone(),
            ..kiln::Options::default()
        };
        let (ag, report) = model.approximate(&opts, &req, &calib)?;
        lines.push(String::new());
        lines.push(report.to_string());
        if let Some(dir) = &args.dump_dir {
            // The approximate graph as text, its report in its `attributes`.
            let path = dir.join("approximate.kir");
            std::fs::write(&path, kiln_ir::text::print(&ag))
                .with_context(|| format!("writing {}", path.display()))?;
            lines.push(format!("wrote {}", path.display()));
        }
        lines.push(String::new());
        lines.extend(crate::approx::density_lines(
            &crate::approx::ffn_densities(&ag, &all)?,
            &format!("{}, approximate graph", calib.source),
        ));
    }
    Ok(lines.join("\n"))
}

/// For each `linear_attention` node: the form `linearise_attention` chose (its chunk) and
/// the estimated cost of it and of the alternatives at the cost model's dims (the quadratic
/// graph as exported, one parallel block, the chunked form, the token-by-token recurrence).
fn linear_attention_forms(cm: &CostModel, g: &Graph) -> Vec<String> {
    use kiln_passes::canon::linear_attention::form_costs;
    let mut lines = vec![];
    for n in g
        .nodes
        .iter()
        .filter(|n| n.op == kiln_ir::OpKind::LinearAttention)
    {
        let size = |k: usize| {
            n.inputs
                .get(k)
                .copied()
                .flatten()
                .and_then(|v| cm.sizes(g.ty(v)))
        };
        let (Some(q), Some(v)) = (size(0), size(2)) else {
            continue;
        };
        if q.len() != 4 || v.len() != 4 {
            continue;
        }
        let causal = n.attrs.int_or("causal", 1).unwrap_or(1) == 1;
        let chunk = n.attrs.int_or("chunk", 0).unwrap_or(0).max(0) as usize;
        let seq = q[2];
        let chosen = if !causal {
            "state (k^T v first)".to_string()
        } else if chunk == 0 || chunk as f64 >= seq {
            "parallel (one block)".to_string()
        } else {
            format!("chunked C={chunk}")
        };
        if lines.is_empty() {
            lines.push("\nlinear attention (linearise_attention): chosen form, estimated cost at the dims above".into());
        }
        lines.push(format!(
            "  %{} [{} x {} heads, seq {}, d {}, dv {}]: {chosen} (chunk attribute {chunk}; a sequence no longer than a chunk runs as one block)",
            g.value(n.outputs[0]).name, q[0], q[1], q[2], q[3], v[3]
        ));
        for f in form_costs(&cm.target, q[0] * q[1], seq, q[3], v[3], causal, chunk) {
            let mark = if f.form == chosen { "*" } else { " " };
            lines.push(format!(
                "    {mark} {:<24} {:>10.3} GFLOP {:>10.2} MB {:>12.1} µs",
                f.form,
                f.flops / 1e9,
                f.bytes / 1e6,
                f.time * 1e6
            ));
        }
    }
    lines
}

/// For each `linear_scan` node: the form `select_recurrence_form` chose (its chunk) and the
/// estimated time of each form at the cost model's dims and threads.
fn recurrence_forms(cm: &CostModel, g: &Graph) -> Vec<String> {
    use kiln_passes::classic::recurrence_form::scan_form_costs;
    let mut lines = vec![];
    for n in g
        .nodes
        .iter()
        .filter(|n| n.op == kiln_ir::OpKind::LinearScan)
    {
        let Some(a) = n.inputs[0].and_then(|v| cm.sizes(g.ty(v))) else {
            continue;
        };
        let Some((&steps, state)) = a.split_first() else {
            continue;
        };
        let (steps, state) = (steps as usize, state.iter().product::<f64>() as usize);
        let chunk = kiln_ir::ops::linear_scan::chunk_of(&n.attrs).unwrap_or(0);
        if lines.is_empty() {
            lines.push(format!(
                "\nlinear recurrences (select_recurrence_form): chosen form, estimated time at the dims above, {} threads",
                cm.target.cores
            ));
        }
        lines.push(format!(
            "  %{} [{steps} steps, state of {state} elements]: chunk attribute {chunk}",
            g.value(n.outputs[0]).name
        ));
        for f in scan_form_costs(&cm.target, steps, state) {
            let mark = if f.chunk == Some(chunk) { "*" } else { " " };
            lines.push(format!(
                "    {mark} {:<34} {:>2} threads {:>12.1} µs",
                f.form,
                f.threads,
                f.time * 1e6
            ));
        }
    }
    lines
}

/// The e-graph pass's name in the pipeline.
const EGRAPH_PASS: &str = "saturate_egraph";

fn run_pass(pass: &dyn Pass, g: &mut Graph) -> Result<PassStats> {
    Ok(pass.run(g)?)
}

/// The e-graph's statistics, from the counters `saturate_egraph` reports.
/// The e-graph block: its report (iterations, e-nodes, e-classes, stop reason, timings,
/// hits per rule), or why there is none.
fn egraph_text(report: Option<&(EgraphReport, bool)>) -> String {
    match report {
        None => format!(
            "e-graph: the {EGRAPH_PASS} pass did not run (turned off, or stopped before it)"
        ),
        Some((r, unchanged)) => {
            let mut s = r.to_string();
            if *unchanged {
                s.push_str("(no cheaper graph found: the graph was left unchanged)\n");
            }
            s
        }
    }
}

/// Every node with a `fused_from` attribute: (op, first output's name, absorbed names).
fn fused_ops(g: &Graph) -> Vec<(String, String, Vec<String>)> {
    g.nodes
        .iter()
        .filter_map(|n| {
            let from = n.attrs.strings(view::FUSED_FROM).ok().flatten()?;
            let out = n
                .outputs
                .first()
                .map(|&o| g.value(o).name.clone())
                .unwrap_or_default();
            Some((n.op.name().to_string(), out, from))
        })
        .collect()
}

fn histogram(g: &Graph) -> BTreeMap<&'static str, i64> {
    let mut h = BTreeMap::new();
    for n in &g.nodes {
        *h.entry(n.op.name()).or_insert(0) += 1;
    }
    h
}

/// `+2 gelu -16 mul ...`: the biggest changes first.
fn diff(a: &BTreeMap<&'static str, i64>, b: &BTreeMap<&'static str, i64>) -> String {
    let mut d: Vec<(&str, i64)> = a
        .keys()
        .chain(b.keys())
        .collect::<HashSet<_>>()
        .into_iter()
        .map(|k| (*k, b.get(k).unwrap_or(&0) - a.get(k).unwrap_or(&0)))
        .filter(|(_, n)| *n != 0)
        .collect();
    d.sort_by(|x, y| y.1.abs().cmp(&x.1.abs()).then(x.0.cmp(y.0)));
    let shown: Vec<String> = d
        .iter()
        .take(8)
        .map(|(k, n)| format!("{n:+} {k}"))
        .collect();
    let mut s = shown.join(" ");
    if d.len() > 8 {
        s.push_str(&format!(" (+{} more)", d.len() - 8));
    }
    s
}

fn fmt_cost(c: &Cost) -> [String; 3] {
    [
        format!("{:.2}", c.flops / 1e6),
        format!("{:.2}", c.bytes / 1e6),
        format!("{:.1}", c.time * 1e6),
    ]
}

fn table(input: &Cost, input_nodes: usize, rows: &[Row]) -> Vec<Vec<String>> {
    let mut t = vec![vec![
        "#".to_string(),
        "pass".into(),
        "time ms".into(),
        "nodes".into(),
        "MFLOP".into(),
        "MB".into(),
        "est µs".into(),
        "op changes".into(),
    ]];
    let [f, b, us] = fmt_cost(input);
    t.push(vec![
        "0".into(),
        "(imported)".into(),
        String::new(),
        input_nodes.to_string(),
        f,
        b,
        us,
        String::new(),
    ]);
    for r in rows {
        let [f, b, us] = fmt_cost(&r.cost);
        let counters: Vec<String> = r
            .stats
            .counters
            .iter()
            .filter(|(k, _)| !k.starts_with("egraph_"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut changes = r.changes.clone();
        if !counters.is_empty() && r.name != EGRAPH_PASS {
            changes = format!("{changes} [{}]", counters.join(" "));
        }
        t.push(vec![
            r.index.to_string(),
            r.name.to_string(),
            format!("{:.2}", r.time.as_secs_f64() * 1e3),
            format!("{} -> {}", r.nodes.0, r.nodes.1),
            f,
            b,
            us,
            changes.trim().to_string(),
        ]);
    }
    t
}

fn print_table(t: &[Vec<String>]) {
    let cols = t.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| t.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in t {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let w = widths[c];
            if c == 1 || c + 1 == cols {
                line.push_str(&format!("{cell:<w$}  "));
            } else {
                line.push_str(&format!("{cell:>w$}  "));
            }
        }
        println!("{}", line.trim_end());
    }
}

fn cost_note(cm: &CostModel) -> String {
    let mut dims: Vec<String> = cm.dims.iter().map(|(k, v)| format!("{k}={v}")).collect();
    dims.sort();
    format!(
        "target: {}\ncost model dims: {}",
        cm.target.describe(),
        if dims.is_empty() {
            "all 1".to_string()
        } else {
            format!("{} (others 1)", dims.join(" "))
        }
    )
}

fn dump(dir: &Option<PathBuf>, g: &Graph, index: usize, pass: &str, when: &str) -> Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    let path = dir.join(format!("{index:02}.{pass}.{when}.kir"));
    std::fs::write(&path, kiln_ir::text::print(g))
        .with_context(|| format!("writing {}", path.display()))
}

/// The cost model, its symbolic dims bound from `--dim`, else from the model's
/// `export.json` `bench_inputs` (matched against the graph inputs' symbolic dims).
fn cost_model(model: &Path, g: &Graph, specs: &[String]) -> Result<CostModel> {
    let mut cm = CostModel::default();
    if let Some(bench) = model
        .parent()
        .map(|d| d.join("export.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|s| bench_inputs(&s))
    {
        for &i in &g.inputs {
            let (Some(sizes), Some(dims)) = (bench.get(&g.value(i).name), g.ty(i).shape.dims())
            else {
                continue;
            };
            for (d, &n) in dims.iter().zip(sizes) {
                if let Dim::Sym(s) = d {
                    cm.dims.insert(s.clone(), n);
                }
            }
        }
    }
    for s in specs {
        let Some((name, n)) = s.split_once('=') else {
            bail!("--dim `{s}` should be NAME=N");
        };
        let n = n
            .parse()
            .with_context(|| format!("--dim `{s}`: not a size"))?;
        cm.dims.insert(name.to_string(), n);
    }
    Ok(cm)
}

/// `"bench_inputs": {"input_ids": [1, 16], ...}` from an export.json, without a JSON
/// library: the object's entries are `"name": [numbers]`.
pub(crate) fn bench_inputs(json: &str) -> HashMap<String, Vec<u64>> {
    let mut out = HashMap::new();
    let Some(start) = json.find("\"bench_inputs\"") else {
        return out;
    };
    let rest = &json[start + "\"bench_inputs\"".len()..];
    let Some(open) = rest.find('{') else {
        return out;
    };
    let Some(close) = rest.find('}') else {
        return out;
    };
    if close < open {
        return out;
    }
    for entry in rest[open + 1..close].split(']') {
        let Some((key, list)) = entry.split_once('[') else {
            continue;
        };
        let name: String = key
            .trim_matches(|c: char| c == ',' || c == ':' || c.is_whitespace())
            .trim_matches('"')
            .to_string();
        let sizes: Option<Vec<u64>> = list.split(',').map(|x| x.trim().parse().ok()).collect();
        if let Some(sizes) = sizes {
            out.insert(name, sizes);
        }
    }
    out
}
