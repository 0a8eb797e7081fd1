#!/usr/bin/env bash
# Prepares `gpu/` (git-ignored) on a CPU machine for scripts/gpu-check.sh on a GPU machine that has
# no Rust: the CUDA build of retort (stripped), the CUDA 13 runtime it links, the golden fixtures
# and the PyTorch reference benchmark. About 30 MiB; the device tool carries it (`carry: ["gpu"]`).
#   scripts/gpu-prepare.sh [SHARED_DIR]     # SHARED_DIR default ../shared
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
./scripts/cuda-build.sh
root=${RETORT_CUDA_DIR:-$HOME/.cache/retort/cuda-13.0}/nvidia/cu13
rm -rf gpu && mkdir -p gpu/lib
cp target/cuda/release/retort gpu/retort && strip gpu/retort
cp "$root/lib/libcudart.so.13" gpu/lib/
cp -r "$shared/fixtures" gpu/fixtures
cp "$shared/bench/torch_bench.py" gpu/
du -sh gpu
