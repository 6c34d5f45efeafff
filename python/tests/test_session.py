"""kiln.InferenceSession against onnxruntime.InferenceSession: the same metadata as ORT
spells it, the same results, run(output_names, input_feed) returning a list."""

import numpy as np
import pytest

import kiln
from conftest import MLP, shared_model, load_test_data

ort = pytest.importorskip("onnxruntime")

# kiln and ORT differ in summation order only.
TOLERANCE = 1e-4


def both(model):
    return (
        kiln.InferenceSession(str(model)),
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]),
    )


@pytest.mark.parametrize("name", ["mlp", "bert_tiny", "gpt2_tiny"])
def test_metadata_and_results_match_onnxruntime(name):
    model = MLP if name == "mlp" else shared_model(name)
    k, o = both(model)
    for a, b in ((k.get_inputs(), o.get_inputs()), (k.get_outputs(), o.get_outputs())):
        assert [x.name for x in a] == [x.name for x in b]
        assert [x.type for x in a] == [x.type for x in b]
        assert [x.shape for x in a] == [x.shape for x in b]
    ins, _ = load_test_data(model)
    got = k.run(None, ins)
    want = o.run(None, ins)
    assert isinstance(got, list) and len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=TOLERANCE, atol=TOLERANCE)


def test_output_names_pick_and_order():
    k = kiln.InferenceSession(MLP)
    ins, outs = load_test_data(MLP)
    (y,) = k.run(["probs"], ins)
    np.testing.assert_allclose(y, outs[0], rtol=TOLERANCE, atol=TOLERANCE)
    assert len(k.run([], ins)) == 1
    with pytest.raises(kiln.InputError, match="unknown output `nope`"):
        k.run(["nope"], ins)


def test_session_options_threads_and_opt_level():
    so = kiln.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    k = kiln.InferenceSession(MLP, sess_options=so, providers=["CPUExecutionProvider"])
    assert k.executable.threads == 1
    ins, outs = load_test_data(MLP)
    np.testing.assert_allclose(k.run(None, ins)[0], outs[0], rtol=TOLERANCE, atol=TOLERANCE)
    assert k.get_providers() == ["KilnJITExecutionProvider"]
