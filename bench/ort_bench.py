#!/usr/bin/env python3
"""ONNX Runtime's latency on given inputs, for `kiln bench --compare-ort`.

usage: ort_bench.py MODEL.onnx --threads N --runs R --warmup W --input NAME=FILE.npy ...
       ort_bench.py MODEL.onnx --threads N --warmup W --serve --input NAME=FILE.npy ...

One session per call: intra_op_num_threads=N, inter_op_num_threads=1, sequential execution,
ORT_ENABLE_ALL graph optimisation. Prints one JSON object: median_ms, min_ms, runs, threads,
version, and compile_ms (session creation).

With --serve it prints one JSON line (compile_ms, version, threads) once warm, then answers
each line `run N [W]` on stdin with a JSON line {"times_ms": [...]} of N timed runs (after W
untimed ones), until `quit` or end of input: `kiln bench --compare-ort` alternates rounds of kiln and ORT runs this way,
so that both see the same machine (a shared machine's speed drifts over seconds).
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--input", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--serve", action="store_true")
    a = ap.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t0 = time.perf_counter()
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    compile_ms = (time.perf_counter() - t0) * 1e3

    feeds = {}
    for spec in a.input:
        name, path = spec.split("=", 1)
        feeds[name] = np.load(path)
    for _ in range(a.warmup):
        sess.run(None, feeds)
    if a.serve:
        serve(sess, feeds, a.threads, compile_ms)
        return
    times = []
    for _ in range(a.runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "runs": a.runs,
        "threads": a.threads,
        "compile_ms": compile_ms,
        "version": ort.__version__,
    }))


def serve(sess, feeds, threads, compile_ms):
    print(json.dumps({"compile_ms": compile_ms, "version": ort.__version__, "threads": threads}),
          flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            return
        n = int(words[1])
        for _ in range(int(words[2]) if len(words) > 2 else 0):
            sess.run(None, feeds)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        print(json.dumps({"times_ms": times}), flush=True)


if __name__ == "__main__":
    main()
