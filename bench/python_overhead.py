"""Python call overhead of kiln's package over its Rust API, printed as markdown rows.

For each model: the median of `runs` calls of the Rust API in a loop with no Python in
between (`Executable._time_rust_runs`, feeds converted once), of `Executable.run(feeds)`
and of `InferenceSession.run(None, feeds)` from Python; the overhead is the difference
of medians, rounds interleaved so machine noise hits all three alike.

    .venv/bin/python bench/python_overhead.py MODEL_DIR [MODEL_DIR ...] [--runs N]
"""

import argparse
import statistics
import time
from pathlib import Path

import onnx
from onnx import numpy_helper

import kiln

ROUNDS = 5


def feeds(model_dir: Path):
    out = {}
    for p in sorted((model_dir / "test_data_set_0").glob("input_*.pb")):
        t = onnx.TensorProto()
        t.ParseFromString(p.read_bytes())
        out[t.name] = numpy_helper.to_array(t)
    return out


def python_times(call, runs):
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    return ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print("| model | threads | Rust API median µs | `Executable.run` median µs | overhead µs | `InferenceSession.run` median µs | overhead µs |")
    print("|---|---|---|---|---|---|---|")
    for m in args.models:
        d = Path(m)
        f = feeds(d)
        sess = kiln.InferenceSession(str(d / "model.onnx"), sess_options=_opts(args.threads))
        exe = sess.executable
        for _ in range(20):  # warm up caches, the thread pool and the allocator
            exe.run(f)
        rust, run, ort_style = [], [], []
        per = max(1, args.runs // ROUNDS)
        for _ in range(ROUNDS):
            rust += exe._time_rust_runs(f, per)
            run += python_times(lambda: exe.run(f), per)
            ort_style += python_times(lambda: sess.run(None, f), per)
        r, p, s = (statistics.median(x) * 1e6 for x in (rust, run, ort_style))
        print(f"| {d.name} | {exe.threads} | {r:.1f} | {p:.1f} | {p - r:+.1f} | {s:.1f} | {s - r:+.1f} |")


def _opts(threads):
    so = kiln.SessionOptions()
    so.intra_op_num_threads = threads
    return so


if __name__ == "__main__":
    main()
