"""Writes the recurrent bench models for bench/recurrent.sh (not committed): a bidirectional
LSTM and a bidirectional GRU (linear_before_reset = 1), S = 64, B = 4, I = 128, H = 256,
shaped as PyTorch's `nn.LSTM` / `nn.GRU` export them (the recurrent node, then Transpose
and Reshape of Y to [S, B, 2H]; seq and batch symbolic), random weights from fixed seeds,
with ONNX Runtime's outputs as test_data_set_0. Needs only onnx, numpy and onnxruntime
(the repo's .venv), unlike scripts/make_recurrent_models.py --bench, which needs torch.

    .venv/bin/python bench/recurrent.py DIR    # DIR/{lstm_big,gru_big}
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

S, B, I, H = 64, 4, 128, 256


def model(kind, rng):
    gates = 4 if kind == "LSTM" else 3
    k = 1.0 / np.sqrt(H)
    u = lambda *shape: rng.uniform(-k, k, shape).astype(np.float32)
    inits = [
        numpy_helper.from_array(u(2, gates * H, I), "W"),
        numpy_helper.from_array(u(2, gates * H, H), "R"),
        numpy_helper.from_array(u(2, 2 * gates * H), "B"),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape"),
    ]
    attrs = {"direction": "bidirectional", "hidden_size": H}
    if kind == "GRU":
        attrs["linear_before_reset"] = 1
    nodes = [
        helper.make_node(kind, ["x", "W", "R", "B"], ["y_raw"], name="rnn", **attrs),
        helper.make_node("Transpose", ["y_raw"], ["y_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["y_t", "shape"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, f"{kind.lower()}_big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", I])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def main():
    root = sys.argv[1]
    for seed, (name, kind) in enumerate([("lstm_big", "LSTM"), ("gru_big", "GRU")]):
        rng = np.random.default_rng(1400 + seed)
        m = model(kind, rng)
        data = os.path.join(root, name, "test_data_set_0")
        os.makedirs(data, exist_ok=True)
        path = os.path.join(root, name, "model.onnx")
        onnx.save(m, path)
        x = rng.standard_normal((S, B, I)).astype(np.float32)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        (y,) = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        with open(os.path.join(data, "input_0.pb"), "wb") as f:
            f.write(numpy_helper.from_array(x, "x").SerializeToString())
        with open(os.path.join(data, "output_0.pb"), "wb") as f:
            f.write(numpy_helper.from_array(y, "y").SerializeToString())
        print(f"wrote {path} ({os.path.getsize(path)} bytes, y {y.shape})")


if __name__ == "__main__":
    main()
