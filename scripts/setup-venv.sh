#!/usr/bin/env bash
# Creates .venv with the Python packages kiln's tests and benchmarks use:
# onnx==1.22.0 (the last wheel that ships the backend node test data) and numpy.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import onnx, numpy; assert onnx.__version__ == '1.22.0'" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "onnx==1.22.0" numpy
fi
