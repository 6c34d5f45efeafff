//! Shared helpers for kiln's integration tests: where the shared models and the ONNX node
//! suite live, running a model on its test data, and the conformance runner.

pub mod conformance;

use kiln_ir::{Graph, Tensor};
use kiln_reference::{compare, TestData, MODEL_TOLERANCE};
use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$KILN_SHARED_MODELS`, else `../shared/models` beside the repository (a worktree
/// elsewhere sets the variable).
pub fn shared_models() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_SHARED_MODELS") {
        return PathBuf::from(p);
    }
    repo_root().join("../shared/models")
}

/// The ONNX backend node tests: `$KILN_ONNX_NODE_TESTS`, or the `onnx` wheel in the
/// repository's `.venv` (which `.ci/run` creates with `onnx==1.22.0`).
pub fn onnx_node_tests() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_ONNX_NODE_TESTS") {
        return Some(PathBuf::from(p));
    }
    let lib = repo_root().join(".venv/lib");
    for entry in std::fs::read_dir(lib).ok()?.flatten() {
        let p = entry
            .path()
            .join("site-packages/onnx/backend/test/data/node");
        if p.is_dir() {
            return Some(p);
        }
    }
    None
}

/// A shared model's folder: `name` is `tiny/bert_tiny`, `bench/opt_1l`, ...
pub fn model_dir(name: &str) -> PathBuf {
    shared_models().join(name)
}

/// `dir/test_data_set_0`'s inputs named after `g`'s inputs (files are matched to inputs by
/// position, as ONNX's runner does), and its reference outputs.
pub fn test_data(g: &Graph, dir: &Path) -> (Vec<(String, Tensor)>, Vec<Tensor>) {
    let data = TestData::load(&dir.join("test_data_set_0"))
        .unwrap_or_else(|e| panic!("{}: test data: {e}", dir.display()));
    assert_eq!(
        data.inputs.len(),
        g.inputs.len(),
        "{}: test data inputs vs graph inputs",
        dir.display()
    );
    let inputs = g
        .inputs
        .iter()
        .zip(data.inputs)
        .map(|(&i, (_, t))| (g.value(i).name.clone(), t))
        .collect();
    (inputs, data.outputs.into_iter().map(|(_, t)| t).collect())
}

/// Borrowed `(name, tensor)` pairs, as `run` functions take them.
pub fn as_named(inputs: &[(String, Tensor)]) -> Vec<(&str, Tensor)> {
    inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect()
}

/// Asserts every output in `got` is within `MODEL_TOLERANCE` of `want`; `what` names the
/// run in the failure message.
pub fn assert_outputs_match(what: &str, got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let e = compare(g, w, MODEL_TOLERANCE);
        assert!(
            e.ok,
            "{what}: output #{k}: max abs {:e}: {:?}",
            e.max_abs, e.reason
        );
    }
}

/// Runs `run` on the inputs of the model in `dir` (whose graph, as the runner sees it, is
/// `g`) and asserts every output matches the reference within `MODEL_TOLERANCE`. Returns the
/// outputs.
pub fn check_on_test_data<E: std::fmt::Display>(
    g: &Graph,
    dir: &Path,
    run: impl FnOnce(&[(&str, Tensor)]) -> Result<Vec<Tensor>, E>,
) -> Vec<Tensor> {
    let (inputs, want) = test_data(g, dir);
    let got = run(&as_named(&inputs)).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    assert_outputs_match(&dir.display().to_string(), &got, &want);
    got
}

/// [`check_on_test_data`] with the reference interpreter.
pub fn check_graph_on_test_data(g: &Graph, dir: &Path) -> Vec<Tensor> {
    check_on_test_data(g, dir, |named| kiln_ir::run_named(g, named))
}
