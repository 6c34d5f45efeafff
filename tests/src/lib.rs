//! Shared helpers for kiln's integration tests: where the shared models and the ONNX node
//! suite live, and the conformance runner.

pub mod conformance;

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `../shared/models` beside the repository.
pub fn shared_models() -> PathBuf {
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
