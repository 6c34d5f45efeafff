#!/usr/bin/env bash
# Writes bench/unrolled.md: full-width RWKV-4, Mamba and Elman RNN models whose recurrence the
# exporter unrolled over time (scripts/make_unrolled_models.py; 2 layers, hidden 256) at
# sequence 16, 64 and 256: kiln's node counts before and after the default pipeline and what
# roll_blocks rolled, compile time, AOT code size, ONNX Runtime's session creation, and
# latency at 1 and 2 threads beside ONNX Runtime in the same run. Issue 18 item 4's goals.
#
# usage: bench/unrolled.sh
#   KILN=path/to/kiln    the binary measured (default: a release build of this checkout)
#   KILN_REV=text        what that binary was built from (default: the HEAD of the checkout
#                        holding it, the tracked files modified there, and the binary's mtime)
#   SEQS="16 64 256"     sequence lengths
#   RUNS=N               timed runs per thread count (default 100; S >= 256: RUNS_LONG, 30)
#   REPS=N               ORT session creations timed (median; default 3)
#   ROUNDS=N             kiln bench --compare-ort processes per model (default 3): medians are
#                        the median over rounds of each round's median, minima the least minimum
#   OUT=FILE             the report (default bench/unrolled.md)
#   KILN_UNROLLED_MODELS=DIR  where the models are (made there unless already present;
#                        default /tmp/kiln-unrolled)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${KILN:-}" ]; then
  cargo build --release --quiet --bin kiln
  KILN=target/release/kiln
fi
if [ -z "${KILN_REV:-}" ]; then
  src=$(git -C "$(dirname "$KILN")" rev-parse --show-toplevel 2>/dev/null || true)
  KILN_REV="git $(git -C "${src:-.}" rev-parse --short HEAD)"
  dirty=$(git -C "${src:-.}" status --short --untracked-files=no | awk '{print $2}' | tr '\n' ' ' | sed 's/ $//')
  [ -n "$dirty" ] && KILN_REV="$KILN_REV plus uncommitted changes to $dirty"
  KILN_REV="$KILN_REV; binary modified $(date -u -r "$KILN" '+%Y-%m-%d %H:%M UTC')"
fi
PY=${PYTHON:-.venv/bin/python}
DIR=${KILN_UNROLLED_MODELS:-/tmp/kiln-unrolled}
SEQS=${SEQS:-16 64 256}
RUNS=${RUNS:-100}
RUNS_LONG=${RUNS_LONG:-30}
REPS=${REPS:-3}
ROUNDS=${ROUNDS:-3}
MODELS=${MODELS:-rwkv mamba rnn}
# Compile time and code size count as independent of S when compile(S_max) <= this many times
# compile(S_min) and the AOT kernel count is the same at every S.
COMPILE_GROWTH_LIMIT=1.5
# The latency goal: kiln median <= this fraction of ORT's median, 1 thread, at GOAL_SEQ.
LATENCY_GOAL=0.5
GOAL_SEQ=64

for m in $MODELS; do
  for s in $SEQS; do
    [ -f "$DIR/${m}_unrolled_s$s/model.onnx" ] && continue
    "$PY" scripts/make_unrolled_models.py --seqs "$(echo $SEQS | tr ' ' ,)" --out "$DIR" --check
    break 2
  done
done

OUT=${OUT:-bench/unrolled.md}
CPU=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
CPU="$CPU ($(grep -qm1 avx512f /proc/cpuinfo && echo AVX-512 || echo no AVX-512), $(lscpu | sed -n "s/^L3 cache:[[:space:]]*//p" | head -1) L3)"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# A private copy: a rebuild of $KILN during the run does not mix two binaries.
cp "$KILN" "$TMP/kiln"
KILN_PATH=$KILN
KILN=$TMP/kiln

ort_session_ms() {
  "$PY" - "$1" "$REPS" <<'PYEOF'
import statistics, sys, time
import onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
ts = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
    ts.append((time.perf_counter() - t) * 1e3)
print("%.1f" % statistics.median(ts))
PYEOF
}

# One row per (model, S) in $TMP/rows: model S imported final roll compile_t1 load kernels
# loopkernels ll_lines aot_s ort_session, per thread (1, 2): median min ort_median ort_min, and
# the JIT plan's kernel count.
for m in $MODELS; do
  for s in $SEQS; do
    f="$DIR/${m}_unrolled_s$s/model.onnx"
    runs=$([ "$s" -ge 256 ] && echo "$RUNS_LONG" || echo "$RUNS")
    insp=$("$KILN" inspect "$f" 2>/dev/null)
    imported=$(echo "$insp" | awk '$2 == "(imported)" {print $3; exit}')
    final=$(echo "$insp" | grep -E '^ *[0-9]+ +[a-z_]+ +[0-9.]+ +[0-9]+ -> [0-9]+' | tail -1 | awk '{print $6}')
    roll=$(echo "$insp" | grep -E '^ *[0-9]+ +roll_(recurrences|blocks) ' | grep -o '\[.*\]' | tr '\n' ' ' || true)
    [ -n "$roll" ] || roll="nothing"
    build=$("$KILN" build "$f" -o "$TMP/m.so" --weights file --emit-ir 2>&1 | grep '\.so (' || true)
    kernels=$(echo "$build" | sed -n 's/.*(\([0-9]*\) kernels.*/\1/p')
    loops=$(echo "$build" | sed -n 's/.*, \([0-9]*\) compiled loop kernels.*/\1/p')
    aot_s=$(echo "$build" | sed -n 's/.*total \([0-9.]*\) s).*/\1/p')
    ll=$(wc -l <"$TMP/m.ll" 2>/dev/null || echo "?")
    rm -f "$TMP"/m.*
    jitk=$("$KILN" bench "$f" --threads 1 --runs 3 --warmup 1 --profile -q 2>/dev/null \
      | sed -n 's/^profile ([^)]*): \([0-9]*\) kernels.*/\1/p')
    rm -f "$TMP"/b*.json
    for r in $(seq "$ROUNDS"); do
      "$KILN" bench "$f" --threads 1,2 --runs "$runs" --compare-ort --format json -q >"$TMP/b$r.json" 2>/dev/null
    done
    ort_s=$(ort_session_ms "$f")
    lat=$("$PY" - "$TMP"/b*.json <<'PYEOF'
import json, statistics, sys
js = [json.load(open(f)) for f in sys.argv[1:]]
rs = [{x["threads"]: x for x in j["results"]} for j in js]
med = statistics.median
out = ["%.1f" % med(r[1]["compile_ms"] for r in rs), "%.1f" % med(j["load_ms"] for j in js)]
for t in (1, 2):
    out += ["%.3f" % med(r[t]["median_ms"] for r in rs), "%.3f" % min(r[t]["min_ms"] for r in rs),
            "%.3f" % med(r[t]["ort"]["median_ms"] for r in rs), "%.3f" % min(r[t]["ort"]["min_ms"] for r in rs)]
print(" ".join(out))
PYEOF
)
    read -r compile load rest <<<"$lat"
    echo "$m $s $imported $final ${roll// /,} $compile $load ${kernels:-?} ${loops:-?} $ll ${aot_s:-?} $ort_s $rest ${jitk:-?}" >>"$TMP/rows"
    echo "measured ${m}_unrolled_s$s" >&2
  done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

{
  echo "# Unrolled recurrences at full width: RWKV-4, Mamba and an Elman RNN (issue 18 item 4)"
  echo
  echo "Generated by \`bench/unrolled.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'). kiln binary: \`$KILN_PATH\`,"
  echo "built from $KILN_REV. CPU: $CPU, $(nproc) cores, shared with other jobs: load average"
  echo "$LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end. ONNX Runtime $("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)')."
  echo
  echo "Models (\`scripts/make_unrolled_models.py\`, random weights, seed fixed, in $DIR, not"
  echo "committed): \`rwkv_unrolled_s{S}\`: RWKV-4, 2 layers, hidden 256, attention 256, FFN 1024,"
  echo "vocab 1000, the WKV recurrence unrolled over S steps as the TorchScript exporter writes"
  echo "HF's \`rwkv_linear_attention_cpu\` (Gather of k_t, v_t, the max-subtracted exp update,"
  echo "ScatterND of each output row); \`mamba_unrolled_s{S}\`: Mamba, 2 layers, d_model 256, inner"
  echo "512, state 16, conv 4, dt_rank 16, vocab 1000, the selective scan unrolled over S steps as"
  echo "HF's \`slow_forward\` (Gather of dA_t, dBx_t, C_t; h = dA_t h + dBx_t; y_t = h C_t by MatMul;"
  echo "Unsqueeze + one Concat); \`rnn_unrolled_s{S}\`: an Elman RNN, 2 layers, hidden 256, vocab"
  echo "1000, written as a Python loop over \`nn.RNNCell\`-style steps (h = tanh(x_t W_ih + h W_hh + b),"
  echo "the steps stacked by Unsqueeze + one Concat: a per-step matmul, not in issue 18's goals)."
  echo "Batch 1, the models' test_data_set_0."
  echo
  echo "Issue 18's goals for these models: kiln's latency at 1 thread at S = $GOAL_SEQ at most"
  echo "${LATENCY_GOAL}x ONNX Runtime's, and kiln's compile time and compiled code size independent of"
  echo "the sequence length (here: compile(S=max) within ${COMPILE_GROWTH_LIMIT}x compile(S=min), and the same"
  echo "AOT kernel count at every S)."
  echo
  echo "## Graph, compile time and code size"
  echo
  echo "nodes = \`kiln inspect\`: as imported -> after the default pipeline; rolled = the rows of"
  echo "roll_recurrences (before the e-graph) and roll_blocks (last but one); a recurrence rolls"
  echo "from MIN_NATIVE_STEP_TRIPS = 16 copies on where its step is elementwise math, row gathers,"
  echo "matmuls and views, else from MIN_STEPPED_TRIPS = 32 (passes/src/classic/roll.rs), so RWKV at"
  echo "S = 16 (fewer than 16 repeated copies) stays unrolled, and the size and compile-time goals are read from S = 64 on. compile = \`kiln bench\`'s compile ms (optimise + JIT codegen + weight packing; the"
  echo "1-thread row), load = reading and importing the file, both the median of $ROUNDS processes. Code size: the JIT does not report its"
  echo "code size, so the same optimised graph is built by the AOT backend (\`kiln build --weights"
  echo "file --emit-ir\`): kernels (compiled loop kernels), lines of the model's LLVM IR, and the"
  echo "build's total seconds; JIT kernels = the JIT plan's kernel count (\`kiln bench --profile\`)."
  echo "ORT session = \`InferenceSession\` creation (1 thread, ORT_ENABLE_ALL,"
  echo "loading included), median of $REPS."
  echo
  echo "| model | S | nodes | rolled | kiln load ms | kiln compile ms | ORT session ms | JIT kernels | AOT kernels (loops) | LLVM IR lines | AOT build s |"
  echo "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
  while read -r m s imp fin roll comp load kern loops ll aot orts k1 k1m o1 o1m k2 k2m o2 o2m jitk; do
    echo "| ${m}_unrolled | $s | $imp -> $fin | ${roll//,/ } | $load | $comp | $orts | $jitk | $kern ($loops) | $ll | $aot |"
  done <"$TMP/rows"
  echo
  echo "## Latency (JIT, batch 1): kiln beside ONNX Runtime in the same \`kiln bench --compare-ort\` run"
  echo
  echo "$ROUNDS rounds (processes) of $RUNS timed runs per thread count ($RUNS_LONG at S >= 256) after 3"
  echo "warm-up runs; median = the median of the rounds' medians, min = the least of their minima; ms."
  echo
  echo "kiln/ORT = ratio of the medians (the goal's measure), and in brackets of the minima."
  echo
  echo "| model | S | t=1 kiln median / min | t=1 ORT median / min | t=1 kiln/ORT | t=2 kiln median / min | t=2 ORT median / min | t=2 kiln/ORT |"
  echo "|---|---:|---|---|---:|---|---|---:|"
  while read -r m s imp fin roll comp load kern loops ll aot orts k1 k1m o1 o1m k2 k2m o2 o2m jitk; do
    echo "| ${m}_unrolled | $s | $k1 / $k1m | $o1 / $o1m | $(ratio "$k1" "$o1") ($(ratio "$k1m" "$o1m")) | $k2 / $k2m | $o2 / $o2m | $(ratio "$k2" "$o2") ($(ratio "$k2m" "$o2m")) |"
  done <"$TMP/rows"
  echo
  echo "## Against the goals (from the numbers above)"
  echo
  for m in $MODELS; do
    # Issue 18 names RWKV and Mamba; the RNN is measured beside them.
    [ "$m" = rnn ] && continue
    # The goals are read where recurrences roll (MIN_STEPPED_TRIPS = 32 steps on).
    first=$(awk -v m="$m" '$1 == m && $2 >= 32' "$TMP/rows" | head -1)
    last=$(awk -v m="$m" '$1 == m' "$TMP/rows" | tail -1)
    goal=$(awk -v m="$m" -v s="$GOAL_SEQ" '$1 == m && $2 == s' "$TMP/rows")
    c0=$(echo "$first" | awk '{print $6}'); c1=$(echo "$last" | awk '{print $6}')
    s0=$(echo "$first" | awk '{print $2}'); s1=$(echo "$last" | awk '{print $2}')
    kset=$(awk -v m="$m" '$1 == m && $2 >= 32 {print $8}' "$TMP/rows" | tr '\n' ' ' | sed 's/ $//')
    growth=$(ratio "$c1" "$c0")
    time_ok=$(awk -v g="$growth" -v l="$COMPILE_GROWTH_LIMIT" 'BEGIN {print (g <= l) ? "met" : "not met"}')
    size_ok=$(echo "$kset" | tr ' ' '\n' | sort -u | wc -l | awk '{print ($1 == 1) ? "met" : "not met"}')
    [ "$s0" = "$s1" ] && { time_ok="not measured (one length)"; size_ok=$time_ok; }
    if [ -n "$goal" ]; then
      r=$(ratio "$(echo "$goal" | awk '{print $13}')" "$(echo "$goal" | awk '{print $15}')")
      lat_ok=$(awk -v r="$r" -v l="$LATENCY_GOAL" 'BEGIN {print (r <= l) ? "met" : "not met"}')
      lat="1-thread latency at S = $GOAL_SEQ: kiln/ORT $r (goal <= $LATENCY_GOAL): **$lat_ok**"
    else
      lat="S = $GOAL_SEQ not measured"
    fi
    echo "- ${m}_unrolled: $lat. Compile time S = $s0 -> $s1: $c0 -> $c1 ms (${growth}x, limit ${COMPILE_GROWTH_LIMIT}x):"
    echo "  **$time_ok**. Code size, AOT kernels at S = $(for q in $SEQS; do [ "$q" -ge 32 ] && printf '%s ' "$q"; done | sed 's/ $//' | tr ' ' /): $kset: **$size_ok**."
  done
  echo
  echo "The machine is shared and noisy (the load averages above): read the medians beside the"
  echo "minima, and the ratios as this run's, not as a stable speed-up."
} >"$OUT"
echo "wrote $OUT"
