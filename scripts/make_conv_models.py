"""Writes the conv-net models (ONNX test layout, reference outputs from ONNX Runtime):

- yolo_slice: a YOLOv8-n-like backbone slice written node by node: Conv-BatchNorm-SiLU blocks
  (BatchNorm left unfused, SiLU as x * sigmoid(x) the way torch exports it), stride-2
  downsampling, C2f blocks (1x1 conv, Split, bottlenecks of two 3x3 convs with a residual
  add, Concat, 1x1 conv), SPPF (three 5x5 stride-1 MaxPools, Concat), then a head step: a
  nearest Resize x2, Concat with the stride-16 feature, a C2f without shortcut and a 1x1
  detect conv with bias. Two outputs (the head and the SPPF feature).
- conv1d_cls: a 1-D conv byte classifier: Gather byte embeddings, Transpose to [N, C, L],
  Conv1d+ReLU+MaxPool1d twice, a dilated Conv1d+ReLU, a depthwise Conv1d, global average
  pool, Gemm to logits.
- unet_dec: a small U-Net-style segmentation net: three conv+ReLU encoder stages (two
  stride-2), a decoder of ConvTranspose 2x2/2 (bias) and ConvTranspose 4x4/2 pad 1 each
  followed by Concat with the encoder skip and a 3x3 conv+ReLU, a 1x1 class head, plus an
  auxiliary 1x1 head on the deepest feature upsampled x4 by a bilinear Resize
  (pytorch_half_pixel) and added to the main head.

The test versions (tests/models/<name>, each under 2 MB) are narrow and small; `--bench DIR`
writes the full-size versions instead (YOLOv8-n widths at 320x320, a 4096-byte sequence,
batch 4), which are not committed. Random weights, fixed seeds. Run with the repo's venv
(onnx, onnxruntime, numpy):
    .venv/bin/python scripts/make_conv_models.py              # tests/models/{yolo_slice,conv1d_cls,unet_dec}
    .venv/bin/python scripts/make_conv_models.py --bench DIR  # the same names under DIR
"""
import argparse
import os
import shutil
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "models")
OPSET = 17


class Builder:
    def __init__(self, rng):
        self.rng = rng
        self.inits, self.nodes = [], []
        self.k = 0

    def name(self, base):
        self.k += 1
        return f"{base}_{self.k}"

    def const(self, base, arr):
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def node(self, op, ins, **kw):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **kw))
        return out

    def nodes_n(self, op, ins, n, **kw):
        outs = [self.name(op.lower()) for _ in range(n)]
        self.nodes.append(helper.make_node(op, ins, outs, name=outs[0], **kw))
        return outs

    def weight(self, shape, fan_in):
        return self.const("w", (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))

    def conv(self, x, c1, c2, k, s=1, bias=False, group=1, dil=1, nd=2):
        ks = [k] * nd
        w = self.weight([c2, c1 // group] + ks, c1 // group * k ** nd)
        ins = [x, w]
        if bias:
            ins.append(self.const("b", (0.1 * self.rng.standard_normal(c2)).astype(np.float32)))
        p = dil * (k - 1) // 2
        return self.node("Conv", ins, kernel_shape=ks, strides=[s] * nd, pads=[p] * (2 * nd),
                         dilations=[dil] * nd, group=group)

    def bn(self, x, c):
        r = self.rng
        scale = self.const("bn_s", (1.0 + 0.1 * r.standard_normal(c)).astype(np.float32))
        shift = self.const("bn_b", (0.1 * r.standard_normal(c)).astype(np.float32))
        mean = self.const("bn_m", (0.1 * r.standard_normal(c)).astype(np.float32))
        var = self.const("bn_v", (0.5 + r.random(c)).astype(np.float32))
        return self.node("BatchNormalization", [x, scale, shift, mean, var], epsilon=1e-3)

    def silu(self, x):
        return self.node("Mul", [x, self.node("Sigmoid", [x])])

    def cbs(self, x, c1, c2, k, s=1):
        """Conv (no bias) - BatchNorm - SiLU, as a YOLOv8 `Conv` module exports."""
        return self.silu(self.bn(self.conv(x, c1, c2, k, s), c2))

    def c2f(self, x, c1, c2, n, shortcut):
        c = c2 // 2
        y = self.cbs(x, c1, 2 * c, 1)
        parts = self.nodes_n("Split", [y, self.const("split", np.array([c, c], np.int64))], 2, axis=1)
        for _ in range(n):
            h = self.cbs(self.cbs(parts[-1], c, c, 3), c, c, 3)
            parts.append(self.node("Add", [parts[-1], h]) if shortcut else h)
        return self.cbs(self.node("Concat", parts, axis=1), (2 + n) * c, c2, 1)

    def sppf(self, x, c1, c2):
        c = c1 // 2
        y = [self.cbs(x, c1, c, 1)]
        for _ in range(3):
            y.append(self.node("MaxPool", [y[-1]], kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2]))
        return self.cbs(self.node("Concat", y, axis=1), 4 * c, c2, 1)

    def model(self, name, inputs, outputs):
        g = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = 8
        return m


def yolo_slice(rng, width, size):
    """YOLOv8-n backbone widths times `width` (16, 32, 64, 128, 256 at 1.0), input size²."""
    w = lambda c: max(8, int(c * width))
    b = Builder(rng)
    x = b.cbs("images", 3, w(16), 3, 2)                # /2
    x = b.cbs(x, w(16), w(32), 3, 2)                   # /4
    x = b.c2f(x, w(32), w(32), 1, True)
    x = b.cbs(x, w(32), w(64), 3, 2)                   # /8
    x = b.c2f(x, w(64), w(64), 2, True)
    x = b.cbs(x, w(64), w(128), 3, 2)                  # /16
    p4 = b.c2f(x, w(128), w(128), 2, True)
    x = b.cbs(p4, w(128), w(256), 3, 2)                # /32
    x = b.c2f(x, w(256), w(256), 1, True)
    p5 = b.sppf(x, w(256), w(256))
    up = b.node("Resize", [p5, "", b.const("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    h = b.c2f(b.node("Concat", [up, p4], axis=1), w(256) + w(128), w(128), 1, False)
    head = b.conv(h, w(128), 64 + 16, 1, bias=True)
    return b.model(
        "yolo_slice",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(head, TensorProto.FLOAT, None),
         helper.make_tensor_value_info(p5, TensorProto.FLOAT, None)])


def conv1d_cls(rng, width, seq):
    """Byte ids [N, seq] -> logits [N, 10]."""
    w = lambda c: max(4, int(c * width))
    b = Builder(rng)
    emb = b.const("emb", (rng.standard_normal((256, w(32)))).astype(np.float32))
    x = b.node("Transpose", [b.node("Gather", [emb, "bytes"], axis=0)], perm=[0, 2, 1])
    x = b.node("Relu", [b.conv(x, w(32), w(64), 7, bias=True, nd=1)])
    x = b.node("MaxPool", [x], kernel_shape=[4], strides=[4])
    x = b.node("Relu", [b.conv(x, w(64), w(128), 5, bias=True, nd=1)])
    x = b.node("MaxPool", [x], kernel_shape=[2], strides=[2])
    x = b.node("Relu", [b.conv(x, w(128), w(128), 3, bias=True, dil=2, nd=1)])
    x = b.node("Relu", [b.conv(x, w(128), w(128), 3, bias=True, group=w(128), nd=1)])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    fc = b.weight([w(128), 10], w(128))
    logits = b.node("Gemm", [x, fc, b.const("fc_b", np.zeros(10, np.float32))])
    return b.model(
        "conv1d_cls",
        [helper.make_tensor_value_info("bytes", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, None)])


def unet_dec(rng, c, size, classes=4):
    """Image [1, 3, size, size] -> per-pixel class logits [1, classes, size, size]."""
    b = Builder(rng)
    relu = lambda x: b.node("Relu", [x])
    e1 = relu(b.conv("image", 3, c, 3, bias=True))                  # size
    e2 = relu(b.conv(e1, c, 2 * c, 3, s=2, bias=True))              # size/2
    e3 = relu(b.conv(e2, 2 * c, 4 * c, 3, s=2, bias=True))          # size/4
    e3 = relu(b.conv(e3, 4 * c, 4 * c, 3, bias=True))

    def up(x, c1, c2, k, pad):
        w = b.weight([c1, c2, k, k], c1)
        bias = b.const("b", (0.1 * rng.standard_normal(c2)).astype(np.float32))
        return b.node("ConvTranspose", [x, w, bias], kernel_shape=[k, k], strides=[2, 2],
                      pads=[pad] * 4)

    d2 = up(e3, 4 * c, 2 * c, 2, 0)                                 # size/2
    d2 = relu(b.conv(b.node("Concat", [d2, e2], axis=1), 4 * c, 2 * c, 3, bias=True))
    d1 = up(d2, 2 * c, c, 4, 1)                                     # size
    d1 = relu(b.conv(b.node("Concat", [d1, e1], axis=1), 2 * c, c, 3, bias=True))
    head = b.conv(d1, c, classes, 1, bias=True)
    aux = b.conv(e3, 4 * c, classes, 1, bias=True)
    aux = b.node("Resize", [aux, "", b.const("scales", np.array([1, 1, 4, 4], np.float32))],
                 mode="linear", coordinate_transformation_mode="pytorch_half_pixel")
    out = b.node("Add", [head, aux])
    return b.model(
        "unet_dec",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def write(out, model, inputs):
    """Saves `model` to out/model.onnx with ORT's outputs as test_data_set_0."""
    if os.path.isdir(out):
        shutil.rmtree(out)
    data = os.path.join(out, "test_data_set_0")
    os.makedirs(data)
    path = os.path.join(out, "model.onnx")
    onnx.save(model, path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    # The reference is the unoptimised graph's (no conv+BN folding by ORT).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    results = sess.run(None, inputs)
    for i, inp in enumerate(sess.get_inputs()):
        with open(os.path.join(data, f"input_{i}.pb"), "wb") as f:
            f.write(numpy_helper.from_array(inputs[inp.name], inp.name).SerializeToString())
    for i, (o, r) in enumerate(zip(sess.get_outputs(), results)):
        with open(os.path.join(data, f"output_{i}.pb"), "wb") as f:
            f.write(numpy_helper.from_array(r, o.name).SerializeToString())
    size = os.path.getsize(path)
    ops = sorted({n.op_type for n in model.graph.node})
    print(f"wrote {out} ({size} bytes; outputs {[r.shape for r in results]}; ops: {', '.join(ops)})")
    return size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", metavar="DIR", help="write the full-size versions to DIR instead")
    a = ap.parse_args()
    full = a.bench is not None
    root = a.bench or ROOT
    rng = np.random.default_rng(2024)
    size = 320 if full else 64
    m = yolo_slice(rng, 1.0 if full else 0.25, size)
    x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    s = write(os.path.join(root, "yolo_slice"), m, {"images": x})
    assert full or s < 2 << 20, s

    rng = np.random.default_rng(2025)
    seq, batch = (4096, 4) if full else (256, 2)
    m = conv1d_cls(rng, 1.0 if full else 0.5, seq)
    ids = rng.integers(0, 256, size=(batch, seq)).astype(np.int64)
    s = write(os.path.join(root, "conv1d_cls"), m, {"bytes": ids})
    assert full or s < 2 << 20, s

    rng = np.random.default_rng(2026)
    size = 256 if full else 32
    m = unet_dec(rng, 32 if full else 8, size)
    x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    s = write(os.path.join(root, "unet_dec"), m, {"image": x})
    assert full or s < 2 << 20, s


if __name__ == "__main__":
    main()
