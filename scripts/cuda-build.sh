#!/usr/bin/env bash
# Builds the CUDA `retort` on a machine without a GPU or a CUDA install:
#   scripts/cuda-build.sh [cargo args...]     # e.g. scripts/cuda-build.sh --tests (also build tests)
# The CUDA 13.0 compiler, headers and libraries come from the registry's NVIDIA wheels, unpacked into
# $RETORT_CUDA_DIR (default ~/.cache/retort/cuda-13.0). CUDA 13.0, not the newest 13.x: the PTX that
# nvcc writes must load on the GPU machines' driver 580 (CUDA 13.0, PTX ISA 9.0).
# The binary goes to target/cuda/release/retort (its own target dir: the CPU build is kept).
# Kernels are compiled for CUDA_COMPUTE_CAP (default 90, the H100/H200). cudarc loads the CUDA
# libraries at run time (libcuda from the driver; cublas, curand, nvrtc from LD_LIBRARY_PATH, e.g.
# the nvidia/*/lib folders of a PyTorch install: scripts/gpu-check.sh sets that up).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${RETORT_CUDA_DIR:-$HOME/.cache/retort/cuda-13.0}
root=$dir/nvidia/cu13
if [ ! -x "$root/nvvm/bin/cicc" ]; then
  echo "== CUDA 13.0 toolkit from the registry's wheels into $dir"
  wheels=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  mkdir -p "$dir"
  for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$dir"; done
  rm -rf "$wheels"
  chmod +x "$root"/bin/* "$root"/nvvm/bin/*
fi
# The linker's name for the runtime that candle's kernels link against.
ln -sf libcudart.so.13 "$root/lib/libcudart.so"

export CUDA_ROOT=$root CUDA_PATH=$root CUDA_TOOLKIT_ROOT_DIR=$root
export PATH=$root/bin:$PATH
export LIBRARY_PATH=$root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
nvcc --version | tail -2
# CARGO_SUBCOMMAND=check only type-checks (still compiling candle's kernels with nvcc).
sub=${CARGO_SUBCOMMAND:-build}
echo "== cargo $sub --release --features cuda (compute capability $CUDA_COMPUTE_CAP)"
cargo "$sub" --release --locked -p retort-cli --features cuda "$@"
[ "$sub" = build ] && echo "built: $CARGO_TARGET_DIR/release/retort"
true
