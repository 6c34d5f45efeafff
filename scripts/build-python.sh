#!/usr/bin/env bash
# Builds kiln's Python package (python/: PyO3 + maturin, one abi3 wheel for CPython >= 3.9)
# from this tree and installs it into .venv, as `pip install ./python` does.
#
# By default it is a dev-profile build that shares target/ with the workspace (its
# dependencies are already built there, at opt-level 2, so this takes about a minute on
# 2 cores): what scripts/test.sh needs. `--release` builds the optimised wheel a user gets
# from a plain `pip install ./python` (several minutes on 2 cores); bench/python.sh uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=dev
if [ "${1:-}" = "--release" ]; then profile=release; fi
.venv/bin/python -c "import maturin" 2>/dev/null || .venv/bin/pip install --quiet --disable-pip-version-check "maturin>=1.9,<2"
export PATH="$PWD/.venv/bin:$PATH" # the maturin build backend runs `maturin`
export CARGO_TARGET_DIR="$PWD/target"
export MATURIN_PEP517_ARGS="--profile $profile"
.venv/bin/pip install --quiet --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./python
