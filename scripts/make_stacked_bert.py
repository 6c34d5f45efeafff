#!/usr/bin/env python3
"""Makes BERT-base-sized encoders with 1, 6, 12 and 24 layers (kiln issue 18, compile time
growing with distinct blocks, not layers) for `bench/recurrence.sh`. Not committed: the
models go to OUT (default /tmp/kiln-stacked-bert), about 37 MB + 28 MB per layer each.

How: the shared `bench/bert_base_1l` (BERT-base width, 1 layer, exported by PyTorch) is the
template; its layer-0 nodes are cloned once per further layer, each layer with its own
random weights (seeded; norm scales and shifts and biases get noise too, so no two layers
share a constant), chained through the hidden state. Inputs keep their symbolic batch and
sequence. Every model gets a test_data_set_0 (batch 1, sequence 128) with ONNX Runtime's
outputs as the reference.

usage: make_stacked_bert.py [--layers 1,6,12,24] [--out DIR] [--template MODEL.onnx]
Needs onnx, numpy and onnxruntime (the repository's .venv has them).
"""

import argparse
import os

import numpy as np
import onnx
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.environ.get("KILN_SHARED_MODELS", os.path.join(HERE, "..", "..", "shared", "models"))
LAYER = "/m/encoder/layer.0/"


def layer_nodes(g):
    """Indices of layer 0's nodes: named under LAYER, plus the constants only they read."""
    named = {i for i, n in enumerate(g.node) if n.name.startswith(LAYER)}
    readers = {}
    for i, n in enumerate(g.node):
        for x in n.input:
            readers.setdefault(x, set()).add(i)
    for i, n in enumerate(g.node):
        if n.op_type == "Constant" and all(readers.get(o, set()) <= named for o in n.output):
            if any(readers.get(o) for o in n.output):
                named.add(i)
    return sorted(named)


def build(template, layers, seed):
    m = onnx.load(template)
    g = m.graph
    idx = layer_nodes(g)
    body = [g.node[i] for i in idx]
    produced = {o for n in body for o in n.output}
    # The layer's hidden-state input: what its first MatMul reads from outside it.
    first_mm = next(n for n in body if n.op_type == "MatMul")
    h_in = first_mm.input[0]
    h_out = g.output[0].name
    inits = {t.name: t for t in g.initializer}
    # Identity nodes (outside the layer) alias the embeddings' norm parameters to layer
    # biases and norm parameters: resolve them so every layer gets its own tensors.
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}
    rng = np.random.default_rng(seed)

    def fresh_weight(like, k):
        a = numpy_helper.to_array(like)
        if a.ndim == 2:
            w = rng.normal(0.0, 0.02, a.shape)
        else:  # biases and norm shifts around 0, norm scales around 1
            base = 1.0 if np.allclose(a, 1.0) else 0.0
            w = base + rng.normal(0.0, 0.02, a.shape)
        return numpy_helper.from_array(w.astype(a.dtype), like.name + f"_L{k}")

    # Layer 0 also gets its own weights (the template's are random init with equal biases).
    new_nodes = [n for i, n in enumerate(g.node) if i not in set(idx) and n.op_type != "Identity"]
    new_inits = [t for t in g.initializer]
    prev = h_in
    for k in range(layers):
        rename = {}
        out_nodes = []
        for n in body:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = n.name.replace("layer.0", f"layer.{k}")
            del c.input[:]
            for x in n.input:
                if x == h_in:
                    c.input.append(prev)
                elif x in produced:
                    c.input.append(f"{x}_L{k}")
                elif alias.get(x, x) in inits and x != "":
                    src = inits[alias.get(x, x)]
                    key = x + f"_L{k}"
                    if key not in rename:
                        t = fresh_weight(src, k)
                        t.name = key
                        new_inits.append(t)
                        rename[key] = True
                    c.input.append(key)
                else:
                    c.input.append(x)
            del c.output[:]
            for o in n.output:
                c.output.append(f"{o}_L{k}")
            out_nodes.append(c)
        new_nodes.extend(out_nodes)
        prev = f"{h_out}_L{k}"
    new_nodes.append(onnx.helper.make_node("Identity", [prev], [h_out], name="output"))
    del g.node[:]
    g.node.extend(new_nodes)
    used = {x for n in g.node for x in n.input}
    del g.initializer[:]
    g.initializer.extend(t for t in new_inits if t.name in used)
    onnx.checker.check_model(m)
    return m


def write(m, folder, seed):
    import onnxruntime as ort

    os.makedirs(os.path.join(folder, "test_data_set_0"), exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    onnx.save(m, path)
    rng = np.random.default_rng(seed)
    s = 128
    feeds = {
        "input_ids": rng.integers(0, 2000, (1, s)).astype(np.int64),
        "attention_mask": np.ones((1, s), np.int64),
        "token_type_ids": np.zeros((1, s), np.int64),
    }
    feeds["attention_mask"][0, s - 9:] = 0
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    data = os.path.join(folder, "test_data_set_0")
    for i, inp in enumerate(sess.get_inputs()):
        t = numpy_helper.from_array(feeds[inp.name], inp.name)
        with open(os.path.join(data, f"input_{i}.pb"), "wb") as f:
            f.write(t.SerializeToString())
    for i, (o, a) in enumerate(zip(sess.get_outputs(), outs)):
        t = numpy_helper.from_array(a, o.name)
        with open(os.path.join(data, f"output_{i}.pb"), "wb") as f:
            f.write(t.SerializeToString())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="1,6,12,24")
    ap.add_argument("--out", default=os.environ.get("KILN_STACKED_MODELS", "/tmp/kiln-stacked-bert"))
    ap.add_argument("--template", default=os.path.join(MODELS, "bench", "bert_base_1l", "model.onnx"))
    a = ap.parse_args()
    for n in [int(x) for x in a.layers.split(",")]:
        folder = os.path.join(a.out, f"bert_base_{n}l")
        write(build(a.template, n, seed=n), folder, seed=0)
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
