#!/usr/bin/env bash
# The test command README.md gives: installs what is missing (scripts/setup.sh: LLVM 19, cc,
# valgrind, the Python venv for the ONNX node tests and ORT), prints the ONNX conformance
# count, then runs every test of the workspace, then rebuilds the Python package from this
# tree (scripts/build-python.sh, a dev-profile build sharing target/) and runs its pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Property tests draw their cases from one fixed seed here, so that a CI verdict can be
# reproduced; plain `cargo test` (or PROPTEST_RNG_SEED=<n> scripts/test.sh) explores others.
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261207}"
scripts/setup.sh
cargo build --workspace --all-targets
cargo run --quiet -p kiln-tests --bin kiln-conformance
cargo test --workspace
scripts/build-python.sh
.venv/bin/python -m pytest -q python/tests
