#!/usr/bin/env python3
"""Writes the small linear-attention test models of tests/models/linattn/ (ONNX test layout):
linear attention and retention in their quadratic parallel form, built with onnx.helper the
way torch.onnx.export writes them (masks and decays made from the runtime sequence length),
with symbolic `batch` and `seq`. Reference outputs come from numpy evaluating the same
quadratic form in float64 at batch 3, seq 7.

    .venv/bin/python scripts/make_linattn_models.py

Variants (inputs xq, xk: [batch, H, seq, D], v: [batch, H, seq, D]; q = elu(xq)+1,
k = elu(xk)+1 for the linear-attention variants, q = xq, k = xk for retention):
  causal         (q kT * tril(ones(seq, seq))) v / (rowsum + 1e-6)       (linattn_tiny's form)
  noncausal      (q kT) v / (rowsum + 1e-6)
  causal_padded  causal, with k and v rows multiplied by a key padding mask pad: [batch, seq]
  retention      (q kT * where(i >= j, exp((i - j) * log_gamma), 0)) v   (retnet_tiny's form)
  causal_pos     causal, with positions: xq, xk + P[range(seq)] (a learned table P: [1024, D]
                 gathered by the positions), and xq scaled by cos(0.05 * position) (a Cast of
                 the same range), the shapes `kiln build --decode-step` drives by `position`
"""
import os
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H, D = 2, 8
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "models", "linattn")


class G:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, arr):
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op, ins, **attrs):
        self.n += 1
        out = f"{op}_{self.n}"
        self.nodes.append(helper.make_node(op, ins, [out], name=f"/{op}_{self.n}", **attrs))
        return out


def seq_len(g, x):
    """Shape(x)[2], a scalar int64 (the runtime sequence length)."""
    s = g.op("Shape", [x])
    return g.op("Gather", [s, g.const(np.array(2, np.int64))], axis=0)


def phi(g, x):
    return g.op("Add", [g.op("Elu", [x], alpha=1.0), g.const(np.array(1.0, np.float32))])


def causal_ones(g, x):
    n = g.op("Unsqueeze", [seq_len(g, x), g.const(np.array([0], np.int64))])
    shape = g.op("Concat", [n, n], axis=0)
    ones = g.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.array([1.0], np.float32)))
    return g.op("Trilu", [ones, g.const(np.array(0, np.int64))], upper=0)


def decay(g, x, log_gamma):
    n = g.op("Cast", [seq_len(g, x)], to=TensorProto.INT64)
    r = g.op("Range", [g.const(np.array(0, np.int64)), n, g.const(np.array(1, np.int64))])
    i = g.op("Reshape", [r, g.const(np.array([-1, 1], np.int64))])
    j = g.op("Reshape", [r, g.const(np.array([1, -1], np.int64))])
    off = g.op("Cast", [g.op("Sub", [i, j])], to=TensorProto.FLOAT)
    e = g.op("Exp", [g.op("Mul", [off, g.const(log_gamma)])])
    cond = g.op("GreaterOrEqual", [i, j])
    zeros = g.op("ConstantOfShape", [g.op("Shape", [e])], value=numpy_helper.from_array(np.array([0.0], np.float32)))
    return g.op("Where", [cond, e, zeros])


POS_TABLE = np.random.default_rng(17).standard_normal((1024, D)).astype(np.float32) * 0.5
POS_FREQ = 0.05


def positions(g, x):
    """(P[range(seq)] : [seq, D], cos(POS_FREQ * range(seq)) : [seq, 1])."""
    r = g.op("Range", [g.const(np.array(0, np.int64)), seq_len(g, x), g.const(np.array(1, np.int64))])
    table = g.op("Gather", [g.const(POS_TABLE), r], axis=0)
    f = g.op("Cast", [r], to=TensorProto.FLOAT)
    c = g.op("Cos", [g.op("Mul", [f, g.const(np.array(POS_FREQ, np.float32))])])
    return table, g.op("Unsqueeze", [c, g.const(np.array([1], np.int64))])


LOG_GAMMA = np.log(1 - 2.0 ** (-5 - np.arange(H, dtype=np.float64))).astype(np.float32).reshape(H, 1, 1)


def build(variant):
    g = G()
    dims = ["batch", H, "seq", D]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("xq", "xk", "v")]
    v = "v"
    if variant == "retention":
        q, k = "xq", "xk"
    elif variant == "causal_pos":
        table, c = positions(g, "xq")
        xq = g.op("Mul", [g.op("Add", ["xq", table]), c])
        q, k = phi(g, xq), phi(g, g.op("Add", ["xk", table]))
    else:
        q, k = phi(g, "xq"), phi(g, "xk")
    if variant == "causal_padded":
        inputs.append(helper.make_tensor_value_info("pad", TensorProto.FLOAT, ["batch", "seq"]))
        p = g.op("Unsqueeze", ["pad", g.const(np.array([1, 3], np.int64))])
        k, v = g.op("Mul", [k, p]), g.op("Mul", [v, p])
    kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
    s = g.op("MatMul", [q, kt])
    if variant in ("causal", "causal_padded", "causal_pos"):
        s = g.op("Mul", [s, causal_ones(g, "xq")])
    elif variant == "retention":
        s = g.op("Mul", [s, decay(g, "xq", LOG_GAMMA)])
    y = g.op("MatMul", [s, v])
    if variant != "retention":
        rs = g.op("ReduceSum", [s, g.const(np.array([-1], np.int64))], keepdims=1)
        y = g.op("Div", [y, g.op("Add", [rs, g.const(np.array(1e-6, np.float32))])])
    g.nodes[-1].output[0] = "y"
    graph = helper.make_graph(g.nodes, variant, inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", H, "seq", D])],
                              g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_linattn_models")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def elu1(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0))) + 1


def reference(variant, ins):
    xq, xk, v = (a.astype(np.float64) for a in ins[:3])
    n = xq.shape[2]
    if variant == "causal_pos":
        pos = np.arange(n)
        table = POS_TABLE.astype(np.float64)[pos]
        xq = (xq + table) * np.cos(POS_FREQ * pos.astype(np.float32)).astype(np.float64)[:, None]
        xk = xk + table
    q, k = (xq, xk) if variant == "retention" else (elu1(xq), elu1(xk))
    if variant == "causal_padded":
        p = ins[3].astype(np.float64)[:, None, :, None]
        k, v = k * p, v * p
    s = q @ np.swapaxes(k, -1, -2)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    if variant in ("causal", "causal_padded", "causal_pos"):
        s = s * (j <= i)
    elif variant == "retention":
        lg = LOG_GAMMA.astype(np.float64)
        s = s * np.where(i >= j, np.exp(np.maximum(i - j, 0) * lg), 0.0)
    y = s @ v
    if variant != "retention":
        y = y / (s.sum(-1, keepdims=True) + 1e-6)
    return y.astype(np.float32)


def main():
    rng = np.random.default_rng(0)
    for variant in ("causal", "noncausal", "causal_padded", "retention", "causal_pos"):
        d = os.path.join(ROOT, variant)
        os.makedirs(os.path.join(d, "test_data_set_0"), exist_ok=True)
        m = build(variant)
        onnx.save(m, os.path.join(d, "model.onnx"))
        b, n = 3, 7
        ins = [rng.standard_normal((b, H, n, D)).astype(np.float32) for _ in range(3)]
        if variant == "causal_padded":
            pad = np.ones((b, n), np.float32)
            pad[1, 5:] = 0
            pad[2, 3:] = 0
            ins.append(pad)
        names = [i.name for i in m.graph.input]
        for idx, (name, a) in enumerate(zip(names, ins)):
            t = numpy_helper.from_array(a, name)
            open(os.path.join(d, "test_data_set_0", f"input_{idx}.pb"), "wb").write(t.SerializeToString())
        out = numpy_helper.from_array(reference(variant, ins), "y")
        open(os.path.join(d, "test_data_set_0", "output_0.pb"), "wb").write(out.SerializeToString())
        try:
            import onnxruntime as ort
            sess = ort.InferenceSession(os.path.join(d, "model.onnx"))
            got = sess.run(None, dict(zip(names, ins)))[0]
            err = np.abs(got - reference(variant, ins)).max()
            print(f"{variant}: written, ORT vs numpy max abs {err:.2e}")
        except ImportError:
            print(f"{variant}: written")


if __name__ == "__main__":
    main()
