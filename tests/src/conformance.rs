//! The ONNX backend node conformance runner: runs every test folder of the `onnx` wheel's
//! `backend/test/data/node` through the importer and the reference interpreter, and sorts
//! each into passed, failed or unsupported.

use kiln_reference::{compare, TestData, ONNX_NODE_TOLERANCE};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// The outcome of one node test.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Every output within tolerance.
    Passed,
    /// Imported but wrong, or failed while running.
    Failed(String),
    /// Uses an op, dtype or input kind kiln does not support.
    Unsupported(String),
}

/// One test's name and outcome.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// The folder name, e.g. `test_add_bcast`.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
}

/// Runs every test under `dir`, sorted by name.
pub fn run_all(dir: &Path) -> std::io::Result<Vec<CaseResult>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let trace = std::env::var_os("KILN_CONFORMANCE_TRACE").is_some();
    Ok(names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            let start = std::time::Instant::now();
            if trace {
                eprint!("{name} ... ");
            }
            let outcome = match catch_unwind(AssertUnwindSafe(|| run_case(&path))) {
                Ok(o) => o,
                Err(p) => Outcome::Failed(format!("PANIC: {}", panic_message(&p))),
            };
            if trace {
                eprintln!(
                    "{:?} {:.2}s",
                    std::mem::discriminant(&outcome),
                    start.elapsed().as_secs_f64()
                );
            }
            CaseResult { name, outcome }
        })
        .collect())
}

/// Runs one test folder (`model.onnx` + `test_data_set_*`).
pub fn run_case(dir: &Path) -> Outcome {
    let g = match kiln_frontend::load(dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => {
            let msg = e.to_string();
            return if is_unsupported(&e) {
                Outcome::Unsupported(msg)
            } else {
                Outcome::Failed(msg)
            };
        }
    };
    let g = &g;
    let mut sets: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_"))
            })
            .collect(),
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    sets.sort();
    if sets.is_empty() {
        return Outcome::Unsupported("no test data".into());
    }
    for set in sets {
        let data = match TestData::load(&set) {
            Ok(d) => d,
            Err(e) => return Outcome::Unsupported(format!("test data: {e}")),
        };
        if data.inputs.len() != g.inputs.len() {
            return Outcome::Failed(format!(
                "{} test inputs for {} graph inputs",
                data.inputs.len(),
                g.inputs.len()
            ));
        }
        let named: Vec<(&str, kiln_ir::Tensor)> = g
            .inputs
            .iter()
            .zip(&data.inputs)
            .map(|(&i, (_, t))| (g.value(i).name.as_str(), t.clone()))
            .collect();
        let outs = match kiln_ir::run_named(g, &named) {
            Ok(o) => o,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        if outs.len() != data.outputs.len() {
            return Outcome::Failed(format!(
                "{} outputs, expected {}",
                outs.len(),
                data.outputs.len()
            ));
        }
        for (k, (got, (_, want))) in outs.iter().zip(&data.outputs).enumerate() {
            let e = compare(got, want, ONNX_NODE_TOLERANCE);
            if !e.ok {
                return Outcome::Failed(format!("output #{k}: {}", e.reason.unwrap_or_default()));
            }
        }
    }
    Outcome::Passed
}

fn is_unsupported(e: &kiln_frontend::LoadError) -> bool {
    use kiln_frontend::onnx::OnnxError;
    matches!(
        e,
        kiln_frontend::LoadError::Onnx(OnnxError::UnsupportedOps { .. })
            | kiln_frontend::LoadError::Onnx(OnnxError::UnsupportedDtype { .. })
            | kiln_frontend::LoadError::Onnx(OnnxError::UnsupportedType { .. })
    )
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Counts of each outcome.
pub fn counts(results: &[CaseResult]) -> (usize, usize, usize) {
    let passed = results
        .iter()
        .filter(|r| r.outcome == Outcome::Passed)
        .count();
    let unsupported = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Unsupported(_)))
        .count();
    (passed, results.len() - passed - unsupported, unsupported)
}

/// A plain-text report: one line per test with its outcome.
pub fn report(results: &[CaseResult]) -> String {
    let mut s = String::new();
    for r in results {
        let (tag, why) = match &r.outcome {
            Outcome::Passed => ("pass", ""),
            Outcome::Failed(w) => ("FAIL", w.as_str()),
            Outcome::Unsupported(w) => ("unsupported", w.as_str()),
        };
        let why = why.lines().next().unwrap_or("");
        s.push_str(&format!("{tag:<12} {}  {why}\n", r.name));
    }
    s
}
