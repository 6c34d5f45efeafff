#!/usr/bin/env python3
"""Makes the recurrent test models (kiln issue 14): a bidirectional LSTM and a bidirectional
GRU with initial states, random weights from fixed seeds, exported by PyTorch into the ONNX
test layout (model.onnx, test_data_set_0/input_*.pb, output_*.pb) with PyTorch's outputs as
the reference. Also a small model whose graph inputs declare dims as -1 and 0 (as Paddle
exports do), with numpy's outputs as its reference (onnxruntime 1.32 itself refuses an
input of size 5 where 0 is declared; kiln takes 0 on a graph input as unknown, as issue 14
asks).

`--bench DIR` instead writes two larger models for `kiln bench` (not committed): a
bidirectional LSTM and GRU with S=64, B=4, I=128, H=256.

Needs torch, onnx and numpy in a venv (git-ignored), e.g.
    python3 -m venv .venv-torch && .venv-torch/bin/pip install torch numpy onnx==1.22.0
    .venv-torch/bin/python scripts/make_recurrent_models.py
The unknown-dims model needs only onnx and numpy (its reference is computed with numpy).
"""

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "models")


def write_case(folder, inputs, outputs):
    data = os.path.join(folder, "test_data_set_0")
    os.makedirs(data, exist_ok=True)
    for i, (name, arr) in enumerate(inputs):
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        with open(os.path.join(data, f"input_{i}.pb"), "wb") as f:
            f.write(t.SerializeToString())
    for i, (name, arr) in enumerate(outputs):
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        with open(os.path.join(data, f"output_{i}.pb"), "wb") as f:
            f.write(t.SerializeToString())


def recurrent_models(bench_dir=None):
    import torch

    class Lstm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(input_size=5, hidden_size=7, bidirectional=True)
            self.head = torch.nn.Linear(14, 3)

        def forward(self, x, h0, c0):
            y, (h, c) = self.rnn(x, (h0, c0))
            return self.head(y), h, c

    class Gru(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.GRU(input_size=4, hidden_size=6, bidirectional=True, batch_first=True)

        def forward(self, x, h0):
            y, h = self.rnn(x, h0)
            return torch.tanh(y), h

    cases = [
        ("lstm_bidir", Lstm, ["x", "h0", "c0"], ["y", "h", "c"],
         [(6, 3, 5), (2, 3, 7), (2, 3, 7)],
         {"x": {0: "seq", 1: "batch"}, "h0": {1: "batch"}, "c0": {1: "batch"}}),
        ("gru_bidir", Gru, ["x", "h0"], ["y", "h"],
         [(3, 5, 4), (2, 3, 6)],
         {"x": {0: "batch", 1: "seq"}, "h0": {1: "batch"}}),
    ]
    if bench_dir is not None:
        class Big(torch.nn.Module):
            def __init__(self, kind):
                super().__init__()
                self.rnn = kind(input_size=128, hidden_size=256, bidirectional=True)

            def forward(self, x):
                return self.rnn(x)[0]

        cases = [
            (name, (lambda k=kind: Big(k)), ["x"], ["y"], [(64, 4, 128)], {"x": {0: "seq", 1: "batch"}})
            for name, kind in [("lstm_big", torch.nn.LSTM), ("gru_big", torch.nn.GRU)]
        ]
    root = bench_dir or ROOT
    for seed, (name, cls, in_names, out_names, shapes, dyn) in enumerate(cases):
        torch.manual_seed(1400 + seed)
        model = cls().eval()
        args = tuple(torch.randn(*s) for s in shapes)
        with torch.no_grad():
            outs = model(*args)
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(
            model, args, path, input_names=in_names, output_names=out_names,
            dynamic_axes=dyn, opset_version=17, dynamo=False,
        )
        onnx.checker.check_model(onnx.load(path))
        write_case(
            folder,
            [(n, a.numpy()) for n, a in zip(in_names, args)],
            [(n, o.numpy()) for n, o in zip(out_names, outs)],
        )
        print(f"{name}: {os.path.getsize(path)} bytes")


def unknown_dims_model():
    """`y = x · w + b` then `relu`, with x declared f32[-1, 0, 4]: -1 and 0 both unknown."""
    rng = np.random.default_rng(1405)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal((3,)).astype(np.float32)
    x_vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 0, 4])
    y_vi = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, -1, 3])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["xwb"]),
        helper.make_node("Relu", ["xwb"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "unknown_dims", [x_vi], [y_vi],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = os.path.join(ROOT, "unknown_dims")
    os.makedirs(folder, exist_ok=True)
    onnx.save(model, os.path.join(folder, "model.onnx"))
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    y = np.maximum(x @ w + b, 0).astype(np.float32)
    write_case(folder, [("x", x)], [("y", y)])
    print("unknown_dims: written")


if __name__ == "__main__":
    if "--bench" in sys.argv:
        recurrent_models(sys.argv[sys.argv.index("--bench") + 1])
        sys.exit(0)
    unknown_dims_model()
    if "--no-torch" not in sys.argv:
        recurrent_models()
