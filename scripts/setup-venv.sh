#!/usr/bin/env bash
# Creates .venv with the Python packages kiln's tests and benchmarks use:
# onnx==1.22.0 (the last wheel that ships the backend node test data), numpy, and
# onnxruntime (the CPU peer `kiln bench --compare-ort` measures against; 1.32.0 is what pip
# resolved here, pinned so benchmark figures stay comparable), pytest and maturin (kiln's
# Python package in python/, built and installed by scripts/build-python.sh when missing),
# and nvidia-cuda-nvcc for `ptxas`, which assembles kiln's PTX for sm_80/sm_90 with no GPU
# (tests/tests/ptx.rs, scripts/ptx-report.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import onnx, numpy, onnxruntime; assert onnx.__version__ == '1.22.0' and onnxruntime.__version__ == '1.32.0'" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "onnx==1.22.0" numpy "onnxruntime==1.32.0"
fi
if ! ls .venv/lib/python*/site-packages/nvidia/cu1*/bin/ptxas >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check "nvidia-cuda-nvcc==13.5.37"
fi
if ! .venv/bin/python -c "import pytest, maturin" 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check pytest "maturin>=1.9,<2"
fi
if ! .venv/bin/python -c "import kiln" 2>/dev/null; then
  scripts/build-python.sh
fi
