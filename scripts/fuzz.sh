#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for N minutes each (default 1) and reports,
# per target, the executions and the crashes found. Not run by CI. Needs cargo-fuzz
# (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP=1 lets it use the stable toolchain.
#
# Seeds: the malformed and resource-hostile models of cli/tests/hostile.rs (ConstantOfShape,
# Expand, Tile and Range asking for gigabytes; truncated, cyclic, deeply nested ...), written
# by that test into fuzz/seeds/onnx_decode, and their text form (`kiln convert`, for those
# that load) into fuzz/seeds/text_parse; the example MLP's weights as safetensors into
# fuzz/seeds/weights_read. The corpus grows in fuzz/corpus/<target>; crashes
# land in fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-1}
[[ $minutes =~ ^[0-9]+$ && $minutes -gt 0 ]] || { echo "usage: scripts/fuzz.sh MINUTES" >&2; exit 1; }
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1

seeds=$PWD/fuzz/seeds
rm -rf "$seeds"
mkdir -p "$seeds/onnx_decode" "$seeds/text_parse" "$seeds/npy_read" "$seeds/weights_read"
KILN_WRITE_FUZZ_SEEDS="$seeds/onnx_decode" cargo test --quiet -p kiln-cli --test hostile write_fuzz_seeds >/dev/null
cargo build --quiet -p kiln-cli
for m in "$seeds"/onnx_decode/*.onnx; do
    target/debug/kiln convert "$m" -o "$seeds/text_parse/$(basename "$m" .onnx).kir" >/dev/null 2>&1 || true
done
cp examples/mlp/model.onnx "$seeds/onnx_decode/mlp.onnx"
# A weights file and the text that names it (the text also seeds text_parse).
target/debug/kiln convert examples/mlp/model.onnx -o "$seeds/weights_read/mlp.kir" \
    --weights "$seeds/weights_read/mlp.safetensors" >/dev/null
mv "$seeds/weights_read/mlp.kir" "$seeds/text_parse/mlp_weights.kir"

printf '%-12s %8s %14s %8s\n' target minutes executions crashes
for t in $(cd fuzz && cargo fuzz list); do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    before=$(find "fuzz/artifacts/$t" -type f | wc -l)
    log=$(mktemp)
    # libFuzzer stops at the first crash; its exit status says so, the artifacts count it.
    (cd fuzz && cargo fuzz run "$t" "corpus/$t" "$seeds/$t" -- \
        -max_total_time=$((minutes * 60)) -rss_limit_mb=2048 -timeout=20 -print_final_stats=1) \
        >"$log" 2>&1 || true
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    after=$(find "fuzz/artifacts/$t" -type f | wc -l)
    printf '%-12s %8s %14s %8s\n' "$t" "$minutes" "${execs:-?}" "$((after - before))"
    if [[ -z $execs ]]; then
        echo "  $t did not report its statistics; the end of its log:" >&2
        tail -5 "$log" >&2
    fi
    rm -f "$log"
done
