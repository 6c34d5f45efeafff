#!/usr/bin/env python3
"""Makes the FFN sparsity test models (kiln issue 16) with onnx + numpy only (random weights
from fixed seeds, numpy reference outputs, ONNX test layout):

- tests/models/sparse/relu_ffn: y = relu(x W1 + b1 + shift) W2 + b2 + x on x[batch, seq, 32],
  FFN width 128. The extra input `shift` [128] moves every pre-activation, so a test picks the
  ReLU density: -1e3 gives 0% active, +1e3 gives 100%, 0 about half. test_data_set_0..3
  (batch 1, seq 1: decode steps), shift 0.
- tests/models/sparse/swiglu_ffn: LLaMA's gated FFN, y = (silu(x Wg) * (x Wu)) Wd + x, named
  output `logits` through a head W_o [32, 50], on x[batch, seq, 32], FFN width 96.
  test_data_set_0..5 (batch 1, seq 1: decode steps), calibration inputs for the
  approximate rewrites.

usage: .venv/bin/python scripts/make_sparse_models.py
"""

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "models", "sparse")
D, F_RELU, F_GLU, VOCAB = 32, 128, 96, 50


def write_set(folder, k, inputs, outputs):
    data = os.path.join(folder, f"test_data_set_{k}")
    os.makedirs(data, exist_ok=True)
    for i, (name, arr) in enumerate(inputs):
        with open(os.path.join(data, f"input_{i}.pb"), "wb") as f:
            f.write(numpy_helper.from_array(np.ascontiguousarray(arr), name).SerializeToString())
    for i, (name, arr) in enumerate(outputs):
        with open(os.path.join(data, f"output_{i}.pb"), "wb") as f:
            f.write(numpy_helper.from_array(np.ascontiguousarray(arr), name).SerializeToString())


def save(model, folder):
    os.makedirs(folder, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(folder, "model.onnx"))


def init(name, arr):
    return numpy_helper.from_array(arr.astype(np.float32), name)


def relu_ffn(rng):
    w1 = rng.standard_normal((D, F_RELU)).astype(np.float32) / np.sqrt(D)
    b1 = (0.1 * rng.standard_normal(F_RELU)).astype(np.float32)
    w2 = rng.standard_normal((F_RELU, D)).astype(np.float32) / np.sqrt(F_RELU)
    b2 = (0.1 * rng.standard_normal(D)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Add", ["a", "b1"], ["ab"]),
        helper.make_node("Add", ["ab", "shift"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["d"]),
        helper.make_node("Add", ["d", "b2"], ["db"]),
        helper.make_node("Add", ["db", "x"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "relu_ffn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D]),
            helper.make_tensor_value_info("shift", TensorProto.FLOAT, [F_RELU]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", D])],
        [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    folder = os.path.join(ROOT, "relu_ffn")
    save(m, folder)
    for k in range(4):
        x = rng.uniform(-2, 2, (1, 1, D)).astype(np.float32)
        shift = np.zeros(F_RELU, np.float32)
        h = np.maximum(x @ w1 + b1 + shift, 0)
        y = (h @ w2 + b2 + x).astype(np.float32)
        write_set(folder, k, [("x", x), ("shift", shift)], [("y", y)])


def swiglu_ffn(rng):
    wg = rng.standard_normal((D, F_GLU)).astype(np.float32) / np.sqrt(D)
    wu = rng.standard_normal((D, F_GLU)).astype(np.float32) / np.sqrt(D)
    wd = rng.standard_normal((F_GLU, D)).astype(np.float32) / np.sqrt(F_GLU)
    wo = rng.standard_normal((D, VOCAB)).astype(np.float32) / np.sqrt(D)
    nodes = [
        helper.make_node("MatMul", ["x", "wg"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["gate"]),
        helper.make_node("MatMul", ["x", "wu"], ["u"]),
        helper.make_node("Mul", ["gate", "u"], ["h"]),
        helper.make_node("MatMul", ["h", "wd"], ["d"]),
        helper.make_node("Add", ["d", "x"], ["r"]),
        helper.make_node("MatMul", ["r", "wo"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes,
        "swiglu_ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        [init("wg", wg), init("wu", wu), init("wd", wd), init("wo", wo)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    folder = os.path.join(ROOT, "swiglu_ffn")
    save(m, folder)
    for k in range(6):
        x = rng.uniform(-2, 2, (1, 1, D)).astype(np.float32)
        gg = x @ wg
        h = gg / (1 + np.exp(-gg)) * (x @ wu)
        logits = ((h @ wd + x) @ wo).astype(np.float32)
        write_set(folder, k, [("x", x)], [("logits", logits)])


if __name__ == "__main__":
    rng = np.random.default_rng(16)
    relu_ffn(rng)
    swiglu_ffn(rng)
    print("wrote", os.path.normpath(ROOT))
