#!/usr/bin/env python3
"""Writes RWKV-4 and Mamba language models whose recurrence is unrolled over time, the way the
TorchScript exporter (torch.onnx.export, dynamo=False, opset 17) writes HF transformers'
`rwkv_linear_attention_cpu` and Mamba's `slow_forward` (compare ../shared/models/tiny/rwkv_tiny
and mamba_tiny): one block of per-step nodes per time step, indexed by scalar int64 constants.
Built with onnx.helper from seeded random weights (no PyTorch), in ONNX's test layout:

    DIR/<name>/model.onnx
    DIR/<name>/test_data_set_0/input_0.pb    input_ids, int64 [batch, S]
    DIR/<name>/test_data_set_0/output_0.pb   last_hidden_state from onnxruntime (1 thread)

Full width (issue 18 item 4; the files are generated, not committed):
  rwkv_unrolled_s{S}   RWKV-4, 2 layers, hidden 256, attention hidden 256, FFN 1024, vocab 1000
  mamba_unrolled_s{S}  Mamba, 2 layers, d_model 256, inner 512, state 16, conv 4, dt_rank 16,
                       vocab 1000, RMSNorm
  rnn_unrolled_s{S}    an Elman RNN written as a Python loop over `nn.RNNCell`-style steps
                       (h = tanh(x_t·W_ih + h·W_hh + b), the steps stacked by one Concat),
                       2 layers, hidden 256, vocab 1000: the per-step matmul case
Batch is symbolic ("batch"), the sequence S is fixed; test data at batch 1.

  --tiny   hidden 32, seq 40, 2 layers, vocab 128, RWKV FFN 64, Mamba inner 64, state 8,
           dt_rank 4 (each file < 200 KB), written to
           tests/models/unrolled/{rwkv,mamba}/ (committed; test data at batch 2; read by
           tests/tests/unrolled_models.rs)
  --check  runs each model in onnxruntime at batch 1 and 2 and compares it with a float64
           numpy reference of the recurrence written as a plain loop over time (independent of
           the ONNX graph), to CHECK_RTOL of the reference's largest magnitude

    .venv/bin/python scripts/make_unrolled_models.py --seqs 16,64,256 --out /tmp/kiln-unrolled --check
    .venv/bin/python scripts/make_unrolled_models.py --tiny --check
"""
import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ORT (f32) against the float64 numpy loop: max |ort - ref| <= CHECK_RTOL * max |ref|.
CHECK_RTOL = 1e-4
RMS_EPS = 1e-5
LN_EPS = 1e-5
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY_OUT = os.path.join(REPO, "tests", "models", "unrolled")

FULL_RWKV = dict(hidden=256, att=256, ffn=1024, vocab=1000, layers=2)
FULL_MAMBA = dict(hidden=256, inner=512, state=16, conv=4, dt_rank=16, vocab=1000, layers=2)
TINY_RWKV = dict(hidden=32, att=32, ffn=64, vocab=128, layers=2)
TINY_MAMBA = dict(hidden=32, inner=64, state=8, conv=4, dt_rank=4, vocab=128, layers=2)
FULL_RNN = dict(hidden=256, vocab=1000, layers=2)
TINY_RNN = dict(hidden=32, vocab=128, layers=2)
TINY_SEQ = 40


class G:
    """A graph under construction: weights become initialisers, the small index and shape
    constants become Constant nodes (as the TorchScript exporter writes them)."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def weight(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def const(self, arr, dtype=np.int64):
        self.n += 1
        out = f"c{self.n}"
        t = numpy_helper.from_array(np.asarray(arr, dtype))
        self.nodes.append(helper.make_node("Constant", [], [out], name=f"/Constant_{self.n}", value=t))
        return out

    def op(self, op, ins, scope="", **attrs):
        self.n += 1
        out = f"{op}_{self.n}"
        self.nodes.append(helper.make_node(op, ins, [out], name=f"{scope}/{op}_{self.n}", **attrs))
        return out

    def ops(self, op, ins, n_out, scope="", **attrs):
        self.n += 1
        outs = [f"{op}_{self.n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, ins, outs, name=f"{scope}/{op}_{self.n}", **attrs))
        return outs

    def model(self, name, seq, hidden, out):
        ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq])
        y = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", seq, hidden])
        graph = helper.make_graph(self.nodes, name, [ids], [y], initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln make_unrolled_models.py")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def fill(value):
    """The one-element `value` tensor of a ConstantOfShape (float32 or int64)."""
    return numpy_helper.from_array(np.array([value], np.float32 if isinstance(value, float) else np.int64))


# ---------------------------------------------------------------------------- RWKV-4


def rwkv_params(cfg, seed):
    rng = np.random.default_rng(seed)
    h, a, f, L = cfg["hidden"], cfg["att"], cfg["ffn"], cfg["layers"]

    def lin(i, o):  # stored as the MatMul right operand [in, out] (the exporter's transpose)
        return rng.uniform(-1, 1, (i, o)) / np.sqrt(i)

    def ln():
        return 1 + 0.1 * rng.standard_normal(h), 0.1 * rng.standard_normal(h)

    p = {"emb": rng.standard_normal((cfg["vocab"], h)), "layers": []}
    for i in range(L):
        lp = {}
        if i == 0:
            lp["pre_ln"] = ln()
        lp["ln1"], lp["ln2"] = ln(), ln()
        ratio = np.arange(a) / max(a - 1, 1)
        # HF's init: decay speeds from -5 to 3 across channels; time_first log(0.3) + zigzag.
        lp["time_decay"] = -5 + 8 * ratio ** (0.7 + 1.3 * i / max(L - 1, 1)) + 0.1 * rng.standard_normal(a)
        lp["time_first"] = np.log(0.3) + 0.5 * ((np.arange(a) + 1) % 3 - 1) + 0.1 * rng.standard_normal(a)
        for k in ("att_mix_k", "att_mix_v", "att_mix_r", "ffn_mix_k", "ffn_mix_r"):
            lp[k] = rng.uniform(0, 1, (1, 1, h))
        lp["key"], lp["value"], lp["receptance"], lp["output"] = lin(h, a), lin(h, a), lin(h, a), lin(a, h)
        lp["ffn_key"], lp["ffn_receptance"], lp["ffn_value"] = lin(h, f), lin(h, h), lin(f, h)
        p["layers"].append(lp)
    p["ln_out"] = ln()
    return p


def time_shift(g, x, s):
    """ZeroPad2d((0, 0, 1, -1)) as the exporter writes it: the pads [0, 0, 1, -1] padded to the
    rank with zeros, reversed in pairs (Reshape, Slice with step -1, Transpose), then Pad."""
    zeros = g.op("ConstantOfShape", [g.const([2])], s, value=fill(0))
    pads = g.op("Concat", [g.const([0, 0, 1, -1]), zeros], s, axis=0)
    pads = g.op("Reshape", [pads, g.const([-1, 2])], s)
    pads = g.op("Slice", [pads, g.const([-1]), g.const([-(2**63) + 1]), g.const([0]), g.const([-1])], s)
    pads = g.op("Reshape", [g.op("Transpose", [pads], s, perm=[1, 0]), g.const([-1])], s)
    return g.op("Pad", [x, pads, g.const(0.0, np.float32)], s, mode="constant")


def layer_norm(g, x, w, b, s):
    return g.op("LayerNormalization", [x, w, b], s, axis=-1, epsilon=LN_EPS)


def mix(g, x, shifted, mix_w, one_minus_w, s):
    return g.op("Add", [g.op("Mul", [x, mix_w], s), g.op("Mul", [shifted, one_minus_w], s)], s)


def wkv(g, k, v, time_decay, time_first, seq, s):
    """HF's rwkv_linear_attention_cpu unrolled over `seq` steps: per step Gather(k, t, axis=1),
    the max-subtracted exp update of num/den/max, and the output row written with ScatterND
    into a zero-initialised [batch, seq, att] buffer."""
    out = g.op("ConstantOfShape", [g.op("Shape", [k], s)], s, value=fill(0.0))
    k0 = g.op("Gather", [k, g.const(0)], s, axis=1)
    zeros = g.op("ConstantOfShape", [g.op("Shape", [k0], s)], s, value=fill(0.0))
    num, den = zeros, zeros
    mx = g.op("Sub", [zeros, g.const(1e38, np.float32)], s)
    w = g.op("Neg", [g.op("Exp", [time_decay], s)], s)
    for t in range(seq):
        ct = g.const(t)
        kt = g.op("Cast", [g.op("Gather", [k, ct], s, axis=1)], s, to=TensorProto.FLOAT)
        vt = g.op("Gather", [v, ct], s, axis=1)
        # output at t
        ww = g.op("Add", [kt, time_first], s)
        q = g.op("Max", [mx, ww], s)
        e1 = g.op("Exp", [g.op("Sub", [mx, q], s)], s)
        e2 = g.op("Exp", [g.op("Sub", [ww, q], s)], s)
        a = g.op("Add", [g.op("Mul", [e1, num], s), g.op("Mul", [e2, vt], s)], s)
        b = g.op("Add", [g.op("Mul", [e1, den], s), e2], s)
        y = g.op("Cast", [g.op("Div", [a, b], s)], s, to=TensorProto.FLOAT)
        # output[:, t] = y: indices [[b, t] for b in range(batch)] as [batch, 1, 2]
        shape = g.op("Shape", [out], s)
        batch = g.op("Gather", [shape, g.const(0)], s, axis=0)
        rows = g.op("Reshape", [g.op("Range", [g.const(0), batch, g.const(1)], s), g.const([-1, 1])], s)
        row_shape = g.op("Shape", [rows], s)
        cols = g.op("Expand", [g.const([t]), row_shape], s)
        idx = g.op("Concat", [g.op("Unsqueeze", [rows, g.const([-1])], s), g.op("Unsqueeze", [cols, g.const([-1])], s)], s, axis=-1)
        upd_shape = g.op("Concat", [row_shape, g.op("Slice", [shape, g.const([2]), g.const([2**63 - 1]), g.const([0])], s)], s, axis=0)
        out = g.op("ScatterND", [out, idx, g.op("Reshape", [y, upd_shape], s)], s)
        # state update
        w2 = g.op("Add", [mx, w], s)
        q2 = g.op("Max", [w2, kt], s)
        e1 = g.op("Exp", [g.op("Sub", [w2, q2], s)], s)
        e2 = g.op("Exp", [g.op("Sub", [kt, q2], s)], s)
        num = g.op("Add", [g.op("Mul", [e1, num], s), g.op("Mul", [e2, vt], s)], s)
        den = g.op("Add", [g.op("Mul", [e1, den], s), e2], s)
        mx = q2
    return out


def rwkv_graph(cfg, seq, p):
    g = G()
    x = g.op("Gather", [g.weight("embeddings.weight", p["emb"]), "input_ids"], "/embeddings")
    for i, lp in enumerate(p["layers"]):
        s = f"/blocks.{i}"
        W = lambda name, arr: g.weight(f"blocks.{i}.{name}", arr)  # noqa: E731
        if i == 0:
            x = layer_norm(g, x, W("pre_ln.weight", lp["pre_ln"][0]), W("pre_ln.bias", lp["pre_ln"][1]), s + "/pre_ln")
        # time mixing (attention)
        sa = s + "/attention"
        h = layer_norm(g, x, W("ln1.weight", lp["ln1"][0]), W("ln1.bias", lp["ln1"][1]), s + "/ln1")
        sh = time_shift(g, h, sa + "/time_shift")
        key = mix(g, h, sh, W("attention.time_mix_key", lp["att_mix_k"]), W("attention.one_minus_mix_key", 1 - lp["att_mix_k"]), sa)
        val = mix(g, h, sh, W("attention.time_mix_value", lp["att_mix_v"]), W("attention.one_minus_mix_value", 1 - lp["att_mix_v"]), sa)
        rec = mix(g, h, sh, W("attention.time_mix_receptance", lp["att_mix_r"]), W("attention.one_minus_mix_receptance", 1 - lp["att_mix_r"]), sa)
        k = g.op("MatMul", [key, W("attention.key.weight", lp["key"])], sa + "/key")
        v = g.op("MatMul", [val, W("attention.value.weight", lp["value"])], sa + "/value")
        r = g.op("Sigmoid", [g.op("MatMul", [rec, W("attention.receptance.weight", lp["receptance"])], sa + "/receptance")], sa)
        rw = wkv(g, k, v, W("attention.time_decay", lp["time_decay"]), W("attention.time_first", lp["time_first"]), seq, sa)
        att = g.op("MatMul", [g.op("Mul", [r, rw], sa), W("attention.output.weight", lp["output"])], sa + "/output")
        x = g.op("Add", [x, att], s)
        # channel mixing (squared-ReLU FFN)
        sf = s + "/feed_forward"
        h = layer_norm(g, x, W("ln2.weight", lp["ln2"][0]), W("ln2.bias", lp["ln2"][1]), s + "/ln2")
        sh = time_shift(g, h, sf + "/time_shift")
        key = mix(g, h, sh, W("feed_forward.time_mix_key", lp["ffn_mix_k"]), W("feed_forward.one_minus_mix_key", 1 - lp["ffn_mix_k"]), sf)
        rec = mix(g, h, sh, W("feed_forward.time_mix_receptance", lp["ffn_mix_r"]), W("feed_forward.one_minus_mix_receptance", 1 - lp["ffn_mix_r"]), sf)
        kk = g.op("Relu", [g.op("MatMul", [key, W("feed_forward.key.weight", lp["ffn_key"])], sf + "/key")], sf)
        kk = g.op("Mul", [kk, kk], sf)
        vv = g.op("MatMul", [kk, W("feed_forward.value.weight", lp["ffn_value"])], sf + "/value")
        rr = g.op("Sigmoid", [g.op("MatMul", [rec, W("feed_forward.receptance.weight", lp["ffn_receptance"])], sf + "/receptance")], sf)
        x = g.op("Add", [x, g.op("Mul", [rr, vv], sf)], s)
    g.nodes.append(helper.make_node("LayerNormalization", [x, g.weight("ln_out.weight", p["ln_out"][0]), g.weight("ln_out.bias", p["ln_out"][1])], ["last_hidden_state"], name="/ln_out/LayerNormalization", axis=-1, epsilon=LN_EPS))
    return g


def np_layer_norm(x, wb):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * wb[0] + wb[1]


def np_shift(x):
    out = np.zeros_like(x)
    out[:, 1:] = x[:, :-1]
    return out


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def rwkv_reference(ids, p):
    """RWKV-4 in float64, the WKV recurrence as HF's loop (max-subtracted exponentials)."""
    x = p["emb"][ids]
    for i, lp in enumerate(p["layers"]):
        if i == 0:
            x = np_layer_norm(x, lp["pre_ln"])
        h = np_layer_norm(x, lp["ln1"])
        sh = np_shift(h)
        k = (h * lp["att_mix_k"] + sh * (1 - lp["att_mix_k"])) @ lp["key"]
        v = (h * lp["att_mix_v"] + sh * (1 - lp["att_mix_v"])) @ lp["value"]
        r = sigmoid((h * lp["att_mix_r"] + sh * (1 - lp["att_mix_r"])) @ lp["receptance"])
        w, u = -np.exp(lp["time_decay"]), lp["time_first"]
        num = np.zeros_like(k[:, 0])
        den = np.zeros_like(k[:, 0])
        mx = np.full_like(k[:, 0], -1e38)
        wkv_out = np.zeros_like(k)
        for t in range(k.shape[1]):
            kt, vt = k[:, t], v[:, t]
            q = np.maximum(mx, kt + u)
            e1, e2 = np.exp(mx - q), np.exp(kt + u - q)
            wkv_out[:, t] = (e1 * num + e2 * vt) / (e1 * den + e2)
            q = np.maximum(mx + w, kt)
            e1, e2 = np.exp(mx + w - q), np.exp(kt - q)
            num, den, mx = e1 * num + e2 * vt, e1 * den + e2, q
        x = x + (r * wkv_out) @ lp["output"]
        h = np_layer_norm(x, lp["ln2"])
        sh = np_shift(h)
        kk = np.maximum((h * lp["ffn_mix_k"] + sh * (1 - lp["ffn_mix_k"])) @ lp["ffn_key"], 0) ** 2
        rr = sigmoid((h * lp["ffn_mix_r"] + sh * (1 - lp["ffn_mix_r"])) @ lp["ffn_receptance"])
        x = x + rr * (kk @ lp["ffn_value"])
    return np_layer_norm(x, p["ln_out"])


# ---------------------------------------------------------------------------- Mamba


def mamba_params(cfg, seed):
    rng = np.random.default_rng(seed)
    d, e, n, kc, r, L = cfg["hidden"], cfg["inner"], cfg["state"], cfg["conv"], cfg["dt_rank"], cfg["layers"]

    def lin(i, o):
        return rng.uniform(-1, 1, (i, o)) / np.sqrt(i)

    p = {"emb": rng.standard_normal((cfg["vocab"], d)), "layers": []}
    for _ in range(L):
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), e))
        p["layers"].append({
            "norm": 1 + 0.1 * rng.standard_normal(d),
            "in_proj": lin(d, 2 * e),
            "conv_w": rng.uniform(-1, 1, (e, 1, kc)) / np.sqrt(kc),
            "conv_b": 0.1 * rng.standard_normal(e),
            "x_proj": lin(e, r + 2 * n),
            "dt_w": rng.uniform(-1, 1, (e, r)) / np.sqrt(r),
            "dt_b": dt + np.log(-np.expm1(-dt)),  # inverse softplus, as HF's init
            "A_log": np.log(np.tile(np.arange(1, n + 1, dtype=np.float64), (e, 1))) + 0.05 * rng.standard_normal((e, n)),
            "D": 1 + 0.1 * rng.standard_normal(e),
            "out_proj": lin(e, d),
        })
    p["norm_f"] = 1 + 0.1 * rng.standard_normal(d)
    return p


def rms_norm(g, x, w, s):
    var = g.op("ReduceMean", [g.op("Pow", [x, g.const(2.0, np.float32)], s)], s, axes=[-1], keepdims=1)
    inv = g.op("Div", [g.const(1.0, np.float32), g.op("Sqrt", [g.op("Add", [var, g.const(RMS_EPS, np.float32)], s)], s)], s)
    return g.op("Mul", [w, g.op("Mul", [x, inv], s)], s)


def silu(g, x, s):
    return g.op("Mul", [x, g.op("Sigmoid", [x], s)], s)


def mamba_graph(cfg, seq, p):
    e, n, r = cfg["inner"], cfg["state"], cfg["dt_rank"]
    g = G()
    x = g.op("Gather", [g.weight("embeddings.weight", p["emb"]), "input_ids"], "/embeddings")
    for i, lp in enumerate(p["layers"]):
        s = f"/layers.{i}"
        sm = s + "/mixer"
        W = lambda name, arr: g.weight(f"layers.{i}.{name}", arr)  # noqa: E731
        h = rms_norm(g, x, W("norm.weight", lp["norm"]), s + "/norm")
        proj = g.op("Transpose", [g.op("MatMul", [h, W("mixer.in_proj.weight", lp["in_proj"])], sm + "/in_proj")], sm, perm=[0, 2, 1])
        hs = g.op("Slice", [proj, g.const([0]), g.const([e]), g.const([1])], sm)
        gate = g.op("Slice", [proj, g.const([e]), g.const([2 * e]), g.const([1])], sm)
        conv = g.op("Conv", [hs, W("mixer.conv1d.weight", lp["conv_w"]), W("mixer.conv1d.bias", lp["conv_b"])], sm,
                    group=e, kernel_shape=[cfg["conv"]], pads=[cfg["conv"] - 1, cfg["conv"] - 1], strides=[1], dilations=[1])
        hs = silu(g, g.op("Slice", [conv, g.const([0]), g.const([seq]), g.const([2]), g.const([1])], sm), sm)  # [b, e, S]
        ssm = g.op("MatMul", [g.op("Transpose", [hs], sm, perm=[0, 2, 1]), W("mixer.x_proj.weight", lp["x_proj"])], sm + "/x_proj")
        ts, B, C = g.ops("Split", [ssm, g.const([r, n, n])], 3, sm, axis=-1)
        dt = g.op("MatMul", [W("mixer.dt_proj.weight", lp["dt_w"]), g.op("Transpose", [ts], sm, perm=[0, 2, 1])], sm)
        dt = g.op("Softplus", [g.op("Add", [dt, W("mixer.dt_proj.bias", lp["dt_b"].reshape(e, 1))], sm)], sm)  # [b, e, S]
        A = g.op("Neg", [g.op("Exp", [W("mixer.A_log", lp["A_log"])], sm)], sm)
        A4 = g.op("Unsqueeze", [g.op("Unsqueeze", [A, g.const([0])], sm), g.const([2])], sm)  # [1, e, 1, n]
        dt4 = g.op("Unsqueeze", [dt, g.const([3])], sm)  # [b, e, S, 1]
        dA = g.op("Exp", [g.op("Mul", [A4, dt4], sm)], sm)  # [b, e, S, n]
        dB = g.op("Mul", [dt4, g.op("Unsqueeze", [B, g.const([1])], sm)], sm)  # [b, e, S, n]
        dBu = g.op("Mul", [dB, g.op("Unsqueeze", [hs, g.const([3])], sm)], sm)
        # ssm_state = zeros(batch, e, n)
        shape = g.op("Shape", [hs], sm)
        batch = g.op("Unsqueeze", [g.op("Gather", [shape, g.const(0)], sm, axis=0), g.const([0])], sm)
        state_shape = g.op("Concat", [batch, g.const([e]), g.const([n])], sm, axis=0)
        state = g.op("ConstantOfShape", [state_shape], sm, value=fill(0.0))
        ys = []
        for t in range(seq):
            ct = g.const(t)
            state = g.op("Add", [g.op("Mul", [g.op("Gather", [dA, ct], sm, axis=2), state], sm), g.op("Gather", [dBu, ct], sm, axis=2)], sm)
            ct_col = g.op("Unsqueeze", [g.op("Gather", [C, ct], sm, axis=1), g.const([-1])], sm)  # [b, n, 1]
            y = g.op("MatMul", [state, ct_col], sm)  # [b, e, 1]
            ys.append(g.op("Unsqueeze", [g.op("Gather", [y, g.const(0)], sm, axis=2), g.const([-1])], sm))
        y = g.op("Concat", ys, sm, axis=-1)  # torch.stack(scan_outputs, dim=-1): [b, e, S]
        y = g.op("Add", [y, g.op("Mul", [hs, W("mixer.D", lp["D"].reshape(1, e, 1))], sm)], sm)
        y = g.op("Mul", [y, silu(g, gate, sm)], sm)
        out = g.op("MatMul", [g.op("Transpose", [y], sm, perm=[0, 2, 1]), W("mixer.out_proj.weight", lp["out_proj"])], sm + "/out_proj")
        x = g.op("Add", [x, out], s)
    h = rms_norm(g, x, g.weight("norm_f.weight", p["norm_f"]), "/norm_f")
    g.nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="/output"))
    return g


def softplus(x):
    return np.logaddexp(0, x)


def np_rms(x, w):
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + RMS_EPS)


def mamba_reference(ids, p):
    """Mamba in float64: causal depthwise conv by its definition, the selective scan as a loop
    over time and state (h = exp(A dt) h + dt B x; y = C h + D x), gated by SiLU."""
    x = p["emb"][ids]
    bsz, seq = ids.shape
    for lp in p["layers"]:
        e, n = lp["A_log"].shape
        r = lp["dt_w"].shape[1]
        proj = np_rms(x, lp["norm"]) @ lp["in_proj"]  # [b, S, 2e]
        hs, gate = proj[..., :e], proj[..., e:]
        kc = lp["conv_w"].shape[2]
        conv = np.zeros_like(hs)
        for t in range(seq):
            for j in range(kc):  # weight tap j sees position t - (kc - 1) + j
                src = t - (kc - 1) + j
                if src >= 0:
                    conv[:, t] += lp["conv_w"][:, 0, j] * hs[:, src]
        conv += lp["conv_b"]
        u = conv * sigmoid(conv)  # [b, S, e]
        ssm = u @ lp["x_proj"]
        ts, B, C = ssm[..., :r], ssm[..., r:r + n], ssm[..., r + n:]
        dt = softplus(ts @ lp["dt_w"].T + lp["dt_b"])  # [b, S, e]
        A = -np.exp(lp["A_log"])
        h = np.zeros((bsz, e, n))
        y = np.zeros((bsz, seq, e))
        for t in range(seq):
            h = np.exp(A * dt[:, t, :, None]) * h + dt[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
            y[:, t] = (h * C[:, t, None, :]).sum(-1)
        y = (y + u * lp["D"]) * (gate * sigmoid(gate))
        x = x + y @ lp["out_proj"]
    return np_rms(x, p["norm_f"])


# ---------------------------------------------------------------------------- writing, checking

MODELS = {
    "rwkv": (rwkv_params, rwkv_graph, rwkv_reference),
    "mamba": (mamba_params, mamba_graph, mamba_reference),
}


# ---------------------------------------------------------------------------- Elman RNN


def rnn_params(cfg, seed):
    rng = np.random.default_rng(seed)
    h = cfg["hidden"]
    s = 1.0 / np.sqrt(h)
    p = {"emb": rng.normal(0, 1, (cfg["vocab"], h)).astype(np.float32), "layers": []}
    for _ in range(cfg["layers"]):
        p["layers"].append({
            "w_ih": rng.uniform(-s, s, (h, h)).astype(np.float32),
            "w_hh": rng.uniform(-s, s, (h, h)).astype(np.float32),
            "b": rng.uniform(-s, s, (h,)).astype(np.float32),
        })
    return p


def rnn_graph(cfg, seq, p):
    g = G()
    hid = cfg["hidden"]
    x = g.op("Gather", [g.weight("emb", p["emb"]), "input_ids"], "/emb")
    for li, lp in enumerate(p["layers"]):
        s = f"/layers.{li}"
        w_ih = g.weight(f"layers.{li}.w_ih", lp["w_ih"])
        w_hh = g.weight(f"layers.{li}.w_hh", lp["w_hh"])
        b = g.weight(f"layers.{li}.b", lp["b"])
        # torch.zeros(batch, hidden): the batch read from the input's shape.
        batch = g.op("Gather", [g.op("Shape", [x], s), g.const(0)], s, axis=0)
        shape = g.op("Concat", [g.op("Unsqueeze", [batch, g.const([0])], s), g.const([hid])], s, axis=0)
        h = g.op("ConstantOfShape", [shape], s, value=fill(0.0))
        outs = []
        for t in range(seq):
            xt = g.op("Gather", [x, g.const(t)], s, axis=1)
            a = g.op("MatMul", [xt, w_ih], s)
            r = g.op("MatMul", [h, w_hh], s)
            h = g.op("Tanh", [g.op("Add", [g.op("Add", [a, r], s), b], s)], s)
            outs.append(g.op("Unsqueeze", [h, g.const([1])], s))
        x = g.op("Concat", outs, s, axis=1)
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="/output"))
    return g


def rnn_reference(ids, p):
    x = p["emb"].astype(np.float64)[ids]
    for lp in p["layers"]:
        h = np.zeros((x.shape[0], x.shape[2]))
        ys = []
        for t in range(x.shape[1]):
            h = np.tanh(x[:, t] @ lp["w_ih"] + h @ lp["w_hh"] + lp["b"])
            ys.append(h)
        x = np.stack(ys, axis=1)
    return x


MODELS["rnn"] = (rnn_params, rnn_graph, rnn_reference)


def ort_session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def token_ids(vocab, batch, seq, seed):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int64)


def write(kind, cfg, seq, d, data_batch, seed):
    params_fn, graph_fn, _ = MODELS[kind]
    p = params_fn(cfg, seed)
    m = graph_fn(cfg, seq, p).model(os.path.basename(d), seq, cfg["hidden"], "last_hidden_state")
    os.makedirs(os.path.join(d, "test_data_set_0"), exist_ok=True)
    path = os.path.join(d, "model.onnx")
    onnx.save(m, path)
    ids = token_ids(cfg["vocab"], data_batch, seq, seed + 1)
    out = ort_session(path).run(None, {"input_ids": ids})[0]
    td = os.path.join(d, "test_data_set_0")
    with open(os.path.join(td, "input_0.pb"), "wb") as f:
        f.write(numpy_helper.from_array(ids, "input_ids").SerializeToString())
    with open(os.path.join(td, "output_0.pb"), "wb") as f:
        f.write(numpy_helper.from_array(out, "last_hidden_state").SerializeToString())
    print(f"wrote {d}: {len(m.graph.node)} nodes, {os.path.getsize(path) / 1e6:.2f} MB", flush=True)
    return p


def check(kind, p, cfg, seq, d, seed):
    """ORT at batch 1 and 2 against the numpy loop; the stored output against ORT."""
    ref_fn = MODELS[kind][2]
    sess = ort_session(os.path.join(d, "model.onnx"))
    ok = True
    for batch in (1, 2):
        ids = token_ids(cfg["vocab"], batch, seq, seed + 100 + batch)
        got = sess.run(None, {"input_ids": ids})[0].astype(np.float64)
        want = ref_fn(ids, p)
        err = np.abs(got - want).max() if np.isfinite(got).all() else np.inf
        scale = np.abs(want).max()
        good = got.shape == want.shape and err <= CHECK_RTOL * scale
        ok &= bool(good)
        print(f"  check {os.path.basename(d)} batch {batch}: max |ort - numpy| {err:.2e} (scale {scale:.2f}, "
              f"tolerance {CHECK_RTOL * scale:.2e}) {'ok' if good else 'FAILED'}", flush=True)
    td = os.path.join(d, "test_data_set_0")
    ids = numpy_helper.to_array(onnx.load_tensor(os.path.join(td, "input_0.pb")))
    stored = numpy_helper.to_array(onnx.load_tensor(os.path.join(td, "output_0.pb")))
    want = ref_fn(ids, p)
    err = np.abs(stored - want).max()
    good = err <= CHECK_RTOL * np.abs(want).max()
    ok &= bool(good)
    print(f"  check {os.path.basename(d)} test data (batch {ids.shape[0]}): max |stored - numpy| {err:.2e} {'ok' if good else 'FAILED'}", flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="16,64,256", help="sequence lengths of the full-width models")
    ap.add_argument("--out", default="/tmp/kiln-unrolled", help="folder of the full-width models")
    ap.add_argument("--models", default="rwkv,mamba,rnn")
    ap.add_argument("--tiny", action="store_true", help=f"write the small test models to {os.path.relpath(TINY_OUT)} instead")
    ap.add_argument("--check", action="store_true", help="check ORT against the numpy reference")
    args = ap.parse_args()
    jobs = []  # (kind, cfg, seq, dir, test-data batch, seed)
    for kind in args.models.split(","):
        if args.tiny:
            cfg = {"rwkv": TINY_RWKV, "mamba": TINY_MAMBA, "rnn": TINY_RNN}[kind]
            jobs.append((kind, cfg, TINY_SEQ, os.path.join(TINY_OUT, kind), 2, 18))
        else:
            cfg = {"rwkv": FULL_RWKV, "mamba": FULL_MAMBA, "rnn": FULL_RNN}[kind]
            for seq in (int(x) for x in args.seqs.split(",")):
                jobs.append((kind, cfg, seq, os.path.join(args.out, f"{kind}_unrolled_s{seq}"), 1, 4))
    ok = True
    for kind, cfg, seq, d, batch, seed in jobs:
        t = time.perf_counter()
        p = write(kind, cfg, seq, d, batch, seed)
        if args.check:
            ok &= check(kind, p, cfg, seq, d, seed)
        print(f"  {time.perf_counter() - t:.1f} s", flush=True)
    if not ok:
        sys.exit("some checks failed")


if __name__ == "__main__":
    main()
