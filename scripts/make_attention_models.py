#!/usr/bin/env python3
"""Writes kiln's own softmax-attention test model, tests/models/attention/mha_causal (ONNX test
layout), for the approximate linearisation (`--approx linear-attention`, issue 17 item 2).

One pre-LN transformer attention block written with onnx.helper the way torch.onnx.export
writes `F.scaled_dot_product_attention(..., is_causal=True)` decomposed: LayerNorm, Q/K/V
projections, split into H heads, Q·Kᵀ·(1/√D) plus an additive causal bias built from the
runtime sequence length (Range, Less, Where(future, -inf, 0)), Softmax, ·V, merge heads,
output projection, residual.
Random weights (seeded); symbolic `batch` and `seq`.

  test_data_set_0   batch 2, seq 12: reference outputs from ONNX Runtime (exactness check)

Heads of width 64, as in most pretrained models (the linear form pays off at long sequences:
the approximation tests calibrate at sequence 1024 on seeded random inputs, not committed).

    .venv/bin/python scripts/make_attention_models.py
"""
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DM, H = 128, 2
D = DM // H
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "models", "attention")


def build():
    rng = np.random.default_rng(17)
    inits = []
    nodes = []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, outs=None, **attrs):
        outs = outs or [f"{op.lower()}_{len(nodes)}"]
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    w = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    x = "x"
    ln = node("LayerNormalization", [x, const("ln_g", (1 + 0.1 * rng.standard_normal(DM)).astype(np.float32)),
                                     const("ln_b", (0.1 * rng.standard_normal(DM)).astype(np.float32))],
              axis=-1, epsilon=1e-5)
    heads_shape = const("heads_shape", np.array([0, 0, H, D], dtype=np.int64))

    def proj(name):
        y = node("MatMul", [ln, const(f"w_{name}", w(DM, DM))])
        y = node("Add", [y, const(f"b_{name}", (0.02 * rng.standard_normal(DM)).astype(np.float32))])
        y = node("Reshape", [y, heads_shape])
        return node("Transpose", [y], perm=[0, 2, 1, 3])  # [b, H, s, D]

    q, k, v = proj("q"), proj("k"), proj("v")
    kt = node("Transpose", [k], perm=[0, 1, 3, 2])
    s = node("MatMul", [q, kt])
    s = node("Mul", [s, const("scale", np.array(1.0 / np.sqrt(D), dtype=np.float32))])
    # Causal mask from the runtime sequence length: key j > query i gets -inf.
    shp = node("Shape", [x])
    seq = node("Gather", [shp, const("one", np.array(1, dtype=np.int64))], axis=0)
    r = node("Range", [const("zero", np.array(0, dtype=np.int64)), seq, const("step", np.array(1, dtype=np.int64))])
    ri = node("Unsqueeze", [r, const("ax1", np.array([1], dtype=np.int64))])  # [s, 1]
    rj = node("Unsqueeze", [r, const("ax0", np.array([0], dtype=np.int64))])  # [1, s]
    future = node("Less", [ri, rj])  # i < j
    bias = node("Where", [future, const("neg_inf", np.array(-np.inf, dtype=np.float32)),
                          const("zero_f", np.array(0.0, dtype=np.float32))])
    s = node("Add", [s, bias])
    p = node("Softmax", [s], axis=-1)
    o = node("MatMul", [p, v])  # [b, H, s, D]
    o = node("Transpose", [o], perm=[0, 2, 1, 3])
    o = node("Reshape", [o, const("merge_shape", np.array([0, 0, DM], dtype=np.int64))])
    o = node("MatMul", [o, const("w_o", w(DM, DM))])
    o = node("Add", [o, const("b_o", (0.02 * rng.standard_normal(DM)).astype(np.float32))])
    node("Add", [x, o], ["y"])
    g = helper.make_graph(
        nodes, "mha_causal",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", DM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", DM])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln-scripts")
    onnx.checker.check_model(m, full_check=True)
    return m


def write_set(folder, sess, x):
    os.makedirs(folder, exist_ok=True)
    (y,) = sess.run(None, {"x": x})
    onnx.save_tensor(numpy_helper.from_array(x, "x"), os.path.join(folder, "input_0.pb"))
    onnx.save_tensor(numpy_helper.from_array(y, "y"), os.path.join(folder, "output_0.pb"))


def main():
    out = os.path.join(ROOT, "mha_causal")
    os.makedirs(out, exist_ok=True)
    m = build()
    onnx.save(m, os.path.join(out, "model.onnx"))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    write_set(os.path.join(out, "test_data_set_0"), sess, rng.standard_normal((2, 12, DM)).astype(np.float32))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
