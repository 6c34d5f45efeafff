#!/usr/bin/env bash
# Installs what kiln needs on a fresh Debian machine, then the Python venv:
# - Debian packages: LLVM 19 (kiln-llvm links it; LLVM_SYS_191_PREFIX in .cargo/config.toml),
#   cc/binutils (AOT libraries are linked with cc; tests read them with readelf/nm), valgrind
#   (one AOT test), python3-venv;
# - .venv (scripts/setup-venv.sh): onnx==1.22.0, numpy, onnxruntime.
# Idempotent and quick when everything is present. Uses sudo when not root.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in llvm-19-dev libpolly-19-dev libzstd-dev zlib1g-dev valgrind gcc libc6-dev binutils; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
  need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}"
fi
scripts/setup-venv.sh
