#!/usr/bin/env bash
# The test command README.md gives: installs what is missing (scripts/setup.sh: LLVM 19, cc,
# valgrind, the Python venv for the ONNX node tests and ORT), prints the ONNX conformance
# count, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --all-targets
cargo run --quiet -p kiln-tests --bin kiln-conformance
cargo test --workspace
