"""Writes calibration sets for `--calibration DIR` in ONNX test layout for a language model
with `input_ids` and, optionally, `attention_mask` inputs: random token ids below the
vocabulary size read from the model's embedding table, an all-ones attention mask (the
last PAD tokens of every other set masked out, so the sets hold key padding too).

usage: python bench/make_calibration.py MODEL.onnx OUT_DIR --seq N [--sets 6] [--pad 0]
"""

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def vocab_size(model: onnx.ModelProto) -> int:
    """Rows of the largest 2-D initializer read by a Gather on input_ids (the embedding)."""
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == "input_ids":
            t = inits.get(n.input[0])
            if t is not None and len(t.dims) == 2:
                return int(t.dims[0])
    raise SystemExit("no embedding Gather on input_ids found: pass a language model")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--sets", type=int, default=6)
    ap.add_argument("--pad", type=int, default=0)
    a = ap.parse_args()
    model = onnx.load(a.model, load_external_data=False)
    vocab = vocab_size(model)
    names = [i.name for i in model.graph.input]
    rng = np.random.default_rng(0)
    for k in range(a.sets):
        d = Path(a.out) / f"test_data_set_{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            if name == "input_ids":
                x = rng.integers(0, vocab, size=(1, a.seq), dtype=np.int64)
            elif name == "attention_mask":
                x = np.ones((1, a.seq), dtype=np.int64)
                if a.pad and k % 2 == 1:
                    x[:, -a.pad:] = 0
            else:
                raise SystemExit(f"unexpected input {name}: only input_ids and attention_mask")
            t = numpy_helper.from_array(x, name)
            (d / f"input_{i}.pb").write_bytes(t.SerializeToString())
    print(f"wrote {a.sets} sets of seq {a.seq} (vocab {vocab}) to {a.out}")


if __name__ == "__main__":
    main()
