"""Shared fixtures: paths of the repository's example model and of the shared models."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("KILN_SHARED_MODELS", REPO.parent / "shared" / "models"))
MLP = REPO / "examples" / "mlp" / "model.onnx"


def shared_model(name: str) -> Path:
    """The shared model `tiny/<name>` or `bench/<name>`; skips the test when absent."""
    for group in ("tiny", "bench"):
        p = SHARED / group / name / "model.onnx"
        if p.is_file():
            return p
    pytest.skip(f"shared model {name} not found under {SHARED}")


def read_pb(path: Path):
    """A TensorProto file as (name, numpy array)."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    t = onnx.TensorProto()
    t.ParseFromString(path.read_bytes())
    return t.name, numpy_helper.to_array(t)


def load_test_data(model: Path):
    """Inputs and reference outputs of test_data_set_0 beside `model`."""
    d = model.parent / "test_data_set_0"
    ins = dict(read_pb(p) for p in sorted(d.glob("input_*.pb")))
    outs = [read_pb(p)[1] for p in sorted(d.glob("output_*.pb"))]
    return ins, outs
