#!/usr/bin/env bash
# Builds gpu-bundle/ (git-ignored) for a machine with an NVIDIA GPU and driver but no Rust
# toolchain: a release `kiln` binary (the CUDA driver is loaded at run time, so it needs
# no CUDA toolkit), the shared tiny and bench models, scripts/gpu-check.sh and
# bench/torch_gpu.py. Copy the folder there and run `bash gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kiln-cli
rm -rf gpu-bundle
mkdir -p gpu-bundle/models
cp target/release/kiln gpu-bundle/
cp scripts/gpu-check.sh bench/torch_gpu.py gpu-bundle/
cp -r ../shared/models/tiny gpu-bundle/models/
mkdir -p gpu-bundle/models/bench
for m in bert_base_1l opt_1l llama_2l_512 vit_s16_6l; do
  cp -r "../shared/models/bench/$m" gpu-bundle/models/bench/
done
du -sh gpu-bundle
