"""Swap ONNX Runtime for kiln by changing one import, on a shared model, and print both
latencies and the largest difference between their outputs.

    .venv/bin/python python/examples/ort_swap.py [MODEL_DIR] [--runs N] [--threads T]

MODEL_DIR defaults to ../shared/models/tiny/bert_tiny (the ONNX test layout: model.onnx
and test_data_set_0/input_*.pb).
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import kiln
import onnxruntime


def feeds(model_dir: Path):
    out = {}
    for p in sorted((model_dir / "test_data_set_0").glob("input_*.pb")):
        t = onnx.TensorProto()
        t.ParseFromString(p.read_bytes())
        out[t.name] = numpy_helper.to_array(t)
    return out


def latency_ms(sess, feed, runs):
    sess.run(None, feed)  # warm up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", nargs="?", default=repo.parent / "shared/models/tiny/bert_tiny")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    model_dir = Path(args.model_dir)
    model = str(model_dir / "model.onnx")
    feed = feeds(model_dir)

    results = {}
    for name, runtime in (("onnxruntime", onnxruntime), ("kiln", kiln)):
        so = runtime.SessionOptions()
        so.intra_op_num_threads = args.threads
        t0 = time.perf_counter()
        # The one line that differs: `runtime` is either module.
        sess = runtime.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - t0
        outs = sess.run(None, feed)
        results[name] = outs
        ms = latency_ms(sess, feed, args.runs)
        print(f"{name:12} load {load_s:6.2f} s   median run {ms:8.3f} ms  ({args.runs} runs)")
    diff = max(
        float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        for a, b in zip(results["kiln"], results["onnxruntime"])
    )
    print(f"largest |kiln - onnxruntime| over {len(results['kiln'])} output(s): {diff:.3g}")


if __name__ == "__main__":
    main()
