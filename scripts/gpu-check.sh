#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (sm_80+) and its driver: every shared
# tiny model must match its test data on `--device cuda`; then batch 1 and 32 timings of
# the four bench models. Runs from a bundle made by scripts/make-gpu-bundle.sh (kiln and
# models/ beside this script), or from a checkout with KILN=target/release/kiln and
# MODELS=../shared/models. Writes gpu-check.md beside it. A few minutes in all.
#   bash gpu-check.sh [--no-bench]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
KILN=${KILN:-$here/kiln}
MODELS=${MODELS:-$here/models}
out=${OUT:-$here/gpu-check.md}
fail=0
{
  echo "# kiln GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
  echo
  echo "## Test data (--device cuda)"
  echo
  echo "| model | result | seconds |"
  echo "|---|---|---:|"
} > "$out"
for dir in "$MODELS"/tiny/*/; do
  name=$(basename "$dir")
  [ -f "$dir/model.onnx" ] || continue
  t0=$(date +%s.%N)
  if log=$(timeout 300 "$KILN" run "$dir/model.onnx" --device cuda --test-data "$dir/test_data_set_0" 2>&1); then
    res=pass
  else
    res="FAIL: $(echo "$log" | tail -1 | cut -c1-200)"; fail=1
  fi
  t1=$(date +%s.%N)
  printf '| %s | %s | %s |\n' "$name" "$res" "$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")" >> "$out"
  echo "$name: $res"
done
if [ "${1:-}" != "--no-bench" ]; then
  {
    echo
    echo "## Latency (kiln bench --device cuda, median ms)"
    echo
  } >> "$out"
  for m in bert_base_1l opt_1l llama_2l_512 vit_s16_6l; do
    dir="$MODELS/bench/$m"
    [ -f "$dir/model.onnx" ] || continue
    for b in 1 32; do
      dims=(--dim batch=$b)
      grep -q '"seq"' "$dir/export.json" && dims+=(--dim seq=128)
      echo "### $m, batch $b" >> "$out"
      timeout 300 "$KILN" bench "$dir/model.onnx" --device cuda "${dims[@]}" --runs 50 --warmup 5 >> "$out" 2>&1 || { echo "(failed)" >> "$out"; fail=1; }
    done
  done
fi
echo "wrote $out"
exit $fail
