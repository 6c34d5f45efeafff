"""Writes the quantised test models (ONNX test layout, reference outputs from ONNX Runtime):

- tests/models/bert_dynq: a small BERT-like encoder (2 layers, hidden 64, 4 heads, FFN 256,
  erf GELU, post-LayerNorm; random weights) quantised with onnxruntime's `quantize_dynamic`
  (int8 weights; activations quantised at run time: DynamicQuantizeLinear -> MatMulInteger
  -> Cast -> Mul).
- tests/models/convnet_qdq: a small conv net (conv 3->8 3x3, relu, conv 8->16 3x3 stride 2,
  relu, depthwise-free; global average pool, gemm 16->10) quantised in QDQ format with
  `quantize_static` (u8 activations, per-channel int8 weights; a tiny random calibration set).
- tests/models/mobile_qop: a MobileNet-like stack (strided stem, dense 3x3, depthwise 3x3,
  pointwise 1x1, strided 3x3, each with ReLU; global average pool, gemm 64->10) quantised in
  QOperator format (`QLinearConv`, ReLU fused by the quantiser), batch 2 × 3 × 24 × 24.

Fixed seeds, random weights. Run with the repo's venv (onnx, onnxruntime, numpy):
    .venv/bin/python scripts/make_quant_models.py

With `--bench DIR` it writes full-size versions for `bench/quant.sh` instead (not committed):
DIR/bert_dynq_base (hidden 384, 6 heads, FFN 1536, 4 layers, batch 1 × seq 128) and
DIR/convnet_qdq_224 (the same conv net on a 224×224 image) and DIR/mobile_qop_224 (the
QOperator stack on a 224×224 image), each with one test-data set.
"""
import argparse
import os
import shutil
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "models")
OPSET = 17


def init(rng, name, shape, scale):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def bert_like(rng, vocab=100, seq_max=32, hidden=64, heads=4, ffn=256, layers=2):
    """A post-LN BERT encoder written node by node (no torch needed)."""
    inits, nodes = [], []
    hd = hidden // heads

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, outs, **kw):
        nodes.append(helper.make_node(op, ins, outs, name=outs[0] + "/" + op, **kw))
        return outs[0]

    def linear(x, p, k, n):
        inits.append(init(rng, p + ".w", (k, n), 1.0 / np.sqrt(k)))
        inits.append(init(rng, p + ".b", (n,), 0.02))
        return node("Add", [node("MatMul", [x, p + ".w"], [p + ".mm"]), p + ".b"], [p + ".out"])

    def layer_norm(x, p):
        inits.append(numpy_helper.from_array(
            (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), p + ".g"))
        inits.append(init(rng, p + ".beta", (hidden,), 0.1))
        return node("LayerNormalization", [x, p + ".g", p + ".beta"], [p + ".out"],
                    axis=-1, epsilon=1e-12)

    inits.append(init(rng, "word_emb", (vocab, hidden), 1.0))
    inits.append(init(rng, "pos_emb", (seq_max, hidden), 0.5))
    # Position ids 0..seq-1 from the input's shape.
    shape = node("Shape", ["input_ids"], ["ids_shape"])
    seq = node("Gather", [shape, const("one", np.array(1, np.int64))], ["seq_len"], axis=0)
    pos = node("Range", [const("zero", np.array(0, np.int64)), seq,
                         const("step", np.array(1, np.int64))], ["pos_ids"])
    emb = node("Add", [node("Gather", ["word_emb", "input_ids"], ["tok_emb"]),
                       node("Gather", ["pos_emb", pos], ["pos_e"])], ["emb"])
    x = layer_norm(emb, "emb_ln")
    # [batch, seq, heads, hd] shape for the head split, and back.
    split = const("split_shape", np.array([0, 0, heads, hd], np.int64))
    merge = const("merge_shape", np.array([0, 0, hidden], np.int64))
    inv_sqrt = const("inv_sqrt_hd", np.array(1.0 / np.sqrt(hd), np.float32))
    half = const("half", np.array(0.5, np.float32))
    one = const("onef", np.array(1.0, np.float32))
    rsqrt2 = const("rsqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    for i in range(layers):
        p = f"l{i}"
        qkv = []
        for t in "qkv":
            h = linear(x, f"{p}.{t}", hidden, hidden)
            h = node("Reshape", [h, split], [f"{p}.{t}.split"])
            perm = [0, 2, 3, 1] if t == "k" else [0, 2, 1, 3]
            qkv.append(node("Transpose", [h], [f"{p}.{t}.heads"], perm=perm))
        s = node("MatMul", [qkv[0], qkv[1]], [f"{p}.scores"])
        s = node("Mul", [s, inv_sqrt], [f"{p}.scaled"])
        a = node("Softmax", [s], [f"{p}.probs"], axis=-1)
        c = node("MatMul", [a, qkv[2]], [f"{p}.ctx"])
        c = node("Transpose", [c], [f"{p}.ctx.t"], perm=[0, 2, 1, 3])
        c = node("Reshape", [c, merge], [f"{p}.ctx.merged"])
        o = linear(c, f"{p}.o", hidden, hidden)
        x = layer_norm(node("Add", [x, o], [f"{p}.res1"]), f"{p}.ln1")
        h = linear(x, f"{p}.ff1", hidden, ffn)
        # erf GELU: 0.5 x (1 + erf(x / sqrt 2))
        e = node("Erf", [node("Mul", [h, rsqrt2], [f"{p}.gs"])], [f"{p}.erf"])
        g = node("Mul", [node("Mul", [h, half], [f"{p}.gh"]),
                         node("Add", [e, one], [f"{p}.g1"])], [f"{p}.gelu"])
        h = linear(g, f"{p}.ff2", ffn, hidden)
        x = layer_norm(node("Add", [x, h], [f"{p}.res2"]), f"{p}.ln2")
    nodes[-1].output[0] = "last_hidden_state"
    graph = helper.make_graph(
        nodes, "bert_like",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                       ["batch", "seq", hidden])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="kiln-make_quant_models")
    onnx.checker.check_model(model)
    return model


def image_classifier(nodes, inits, name, size):
    """The checked model of a graph from an image `x` [batch, 3, size, size] to `logits`."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="kiln-make_quant_models")
    onnx.checker.check_model(model)
    return model


def conv_net(rng, size=16):
    inits = [
        init(rng, "c1.w", (8, 3, 3, 3), 0.3), init(rng, "c1.b", (8,), 0.1),
        init(rng, "c2.w", (16, 8, 3, 3), 0.15), init(rng, "c2.b", (16,), 0.1),
        init(rng, "fc.w", (16, 10), 0.3), init(rng, "fc.b", (10,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="c2",
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc"),
    ]
    return image_classifier(nodes, inits, "convnet", size)


def mobile_net(rng, size=24):
    """A MobileNet-like stack for the QOperator (QLinearConv) models: a strided stem, a
    dense 3x3 conv, a depthwise 3x3 conv, a pointwise 1x1 conv and a strided 3x3 conv, each
    followed by ReLU, then global average pool and a classifier."""
    inits = []
    nodes = []
    x = "x"

    def conv(name, x, cin, cout, k, stride=1, group=1):
        inits.append(init(rng, f"{name}.w", (cout, cin // group, k, k),
                          (2.0 / (cin // group * k * k)) ** 0.5))
        inits.append(init(rng, f"{name}.b", (cout,), 0.1))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                                      pads=[k // 2] * 4, strides=[stride, stride], group=group))
        nodes.append(helper.make_node("Relu", [name], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    x = conv("stem", x, 3, 16, 3, stride=2)
    x = conv("c2", x, 16, 32, 3)
    x = conv("dw", x, 32, 32, 3, group=32)
    x = conv("pw", x, 32, 64, 1)
    x = conv("c3", x, 64, 64, 3, stride=2)
    inits += [init(rng, "fc.w", (64, 10), 0.2), init(rng, "fc.b", (10,), 0.1)]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc"),
    ]
    return image_classifier(nodes, inits, "mobile_net", size)


def quantize_qoperator(f32, q, rng, size):
    """QOperator form: Conv+ReLU become QLinearConv (u8 activations, per-channel int8
    weights); the rest stays f32 between a DequantizeLinear and the classifier."""
    quantize_static(f32, q, RandomReader(rng, size=size), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=["Conv", "Relu"])


class RandomReader(CalibrationDataReader):
    """A few seeded random images."""

    def __init__(self, rng, n=4, size=16):
        self.data = iter([{"x": rng.standard_normal((1, 3, size, size)).astype(np.float32)}
                          for _ in range(n)])

    def get_next(self):
        return next(self.data, None)


def write(name, model_path, inputs, root=ROOT, max_bytes=2 << 20):
    """Copies the quantised model to <root>/<name> with ORT's outputs as reference."""
    out = os.path.join(root, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "test_data_set_0"))
    shutil.copy(model_path, os.path.join(out, "model.onnx"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    results = sess.run(None, inputs)
    data = os.path.join(out, "test_data_set_0")
    for i, inp in enumerate(sess.get_inputs()):
        with open(os.path.join(data, f"input_{i}.pb"), "wb") as f:
            f.write(numpy_helper.from_array(inputs[inp.name], inp.name).SerializeToString())
    for i, (o, r) in enumerate(zip(sess.get_outputs(), results)):
        with open(os.path.join(data, f"output_{i}.pb"), "wb") as f:
            f.write(numpy_helper.from_array(r, o.name).SerializeToString())
    size = os.path.getsize(os.path.join(out, "model.onnx"))
    assert size < max_bytes, f"{name}: {size} bytes"
    ops = sorted({n.op_type for n in onnx.load(model_path).graph.node})
    print(f"wrote {out} ({size} bytes; ops: {', '.join(ops)})")


def bench_models(root):
    """Full-size versions for bench/quant.sh (not committed)."""
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(99)
        f32 = os.path.join(tmp, "bert.onnx")
        onnx.save(bert_like(rng, vocab=1000, seq_max=128, hidden=384, heads=6, ffn=1536,
                            layers=4), f32)
        q = os.path.join(tmp, "bert_dynq_base.onnx")
        quantize_dynamic(f32, q, weight_type=QuantType.QInt8)
        ids = rng.integers(0, 1000, size=(1, 128)).astype(np.int64)
        write("bert_dynq_base", q, {"input_ids": ids}, root, 64 << 20)

        rng = np.random.default_rng(98)
        f32 = os.path.join(tmp, "convnet.onnx")
        onnx.save(conv_net(rng, 224), f32)
        q = os.path.join(tmp, "convnet_qdq_224.onnx")
        quantize_static(f32, q, RandomReader(rng, size=224), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
        x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
        write("convnet_qdq_224", q, {"x": x}, root, 64 << 20)

        rng = np.random.default_rng(97)
        f32 = os.path.join(tmp, "mobile.onnx")
        onnx.save(mobile_net(rng, 224), f32)
        q = os.path.join(tmp, "mobile_qop_224.onnx")
        quantize_qoperator(f32, q, rng, 224)
        x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
        write("mobile_qop_224", q, {"x": x}, root, 64 << 20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", metavar="DIR", help="write the full-size benchmark models to DIR")
    args = ap.parse_args()
    if args.bench:
        bench_models(args.bench)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(1234)
        f32 = os.path.join(tmp, "bert.onnx")
        onnx.save(bert_like(rng), f32)
        q = os.path.join(tmp, "bert_dynq.onnx")
        quantize_dynamic(f32, q, weight_type=QuantType.QInt8)
        ids = rng.integers(0, 100, size=(2, 12)).astype(np.int64)
        write("bert_dynq", q, {"input_ids": ids})

        rng = np.random.default_rng(4321)
        f32 = os.path.join(tmp, "convnet.onnx")
        onnx.save(conv_net(rng), f32)
        q = os.path.join(tmp, "convnet_qdq.onnx")
        quantize_static(f32, q, RandomReader(rng), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
        x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
        write("convnet_qdq", q, {"x": x})

        rng = np.random.default_rng(2468)
        f32 = os.path.join(tmp, "mobile.onnx")
        onnx.save(mobile_net(rng), f32)
        q = os.path.join(tmp, "mobile_qop.onnx")
        quantize_qoperator(f32, q, rng, 24)
        x = rng.standard_normal((2, 3, 24, 24)).astype(np.float32)
        write("mobile_qop", q, {"x": x})


if __name__ == "__main__":
    main()
