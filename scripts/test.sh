#!/usr/bin/env bash
# The test command README.md gives: sets up the Python venv (ONNX node tests), prints the
# ONNX conformance count, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
cargo build --workspace --all-targets
cargo run --quiet -p kiln-tests --bin kiln-conformance
cargo test --workspace
