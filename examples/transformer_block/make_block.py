"""Writes the weights of examples/transformer_block/block.kir (block.safetensors, random,
seed 0) and a reference computed here with numpy (test_data_set_0/: input_0.pb, x of
shape [2, 7, 64]; output_0.pb). Run from the repository root:

    .venv/bin/python examples/transformer_block/make_block.py

The safetensors file is written by hand (an 8-byte header length, a JSON header, the
little-endian data), so only numpy and onnx are needed.
"""

import json
import math
import struct
from pathlib import Path

import numpy as np
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
D, HEADS, FF = 64, 4, 256


def weights(rng):
    w = {}
    for n in ("ln1", "ln2"):
        w[f"{n}.weight"] = 1.0 + 0.1 * rng.standard_normal(D)
        w[f"{n}.bias"] = 0.1 * rng.standard_normal(D)
    for n in ("wq", "wk", "wv", "wo"):
        w[f"attn.{n}"] = rng.standard_normal((D, D)) / math.sqrt(D)
    w["attn.bo"] = 0.1 * rng.standard_normal(D)
    w["mlp.w1"] = rng.standard_normal((D, FF)) / math.sqrt(D)
    w["mlp.b1"] = 0.1 * rng.standard_normal(FF)
    w["mlp.w2"] = rng.standard_normal((FF, D)) / math.sqrt(FF)
    w["mlp.b2"] = 0.1 * rng.standard_normal(D)
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        b = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # keep the data 8-byte aligned, so it is used in place
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def block(x, w):
    x = x.astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in w.items()}
    B, S, _ = x.shape
    h = layer_norm(x, w["ln1.weight"], w["ln1.bias"])
    split = lambda t: t.reshape(B, S, HEADS, D // HEADS).transpose(0, 2, 1, 3)
    q, k, v = (split(h @ w[f"attn.{n}"]) for n in ("wq", "wk", "wv"))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D // HEADS)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ctx = (p @ v).transpose(0, 2, 1, 3).reshape(B, S, D)
    r1 = x + ctx @ w["attn.wo"] + w["attn.bo"]
    h2 = layer_norm(r1, w["ln2.weight"], w["ln2.bias"])
    f = gelu(h2 @ w["mlp.w1"] + w["mlp.b1"]) @ w["mlp.w2"] + w["mlp.b2"]
    return (r1 + f).astype(np.float32)


def main():
    rng = np.random.default_rng(0)
    w = weights(rng)
    write_safetensors(HERE / "block.safetensors", w)
    x = rng.standard_normal((2, 7, D)).astype(np.float32)
    out = HERE / "test_data_set_0"
    out.mkdir(exist_ok=True)
    (out / "input_0.pb").write_bytes(numpy_helper.from_array(x, "x").SerializeToString())
    (out / "output_0.pb").write_bytes(numpy_helper.from_array(block(x, w), "out").SerializeToString())
    print(f"wrote {HERE / 'block.safetensors'} ({len(w)} tensors) and {out}")


if __name__ == "__main__":
    main()
