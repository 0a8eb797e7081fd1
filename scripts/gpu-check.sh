#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, PyTorch and transformers (no Rust needed), after
# scripts/gpu-prepare.sh made `gpu/` on a build machine:
#   scripts/gpu-check.sh [OUT_DIR]
# 1. `retort device-check` in f32 and bf16: the fixtures' logits, scoring and greedy generation
#    against transformers, and a training step's loss and gradient norm against the CPU (bounds in
#    `retort device-check --help` and crates/retort/src/device_check.rs);
# 2. `retort bench --device cuda` beside `torch_bench.py --device cuda` on bench-0.5b (a
#    Qwen2.5-0.5B-shaped model) in f32 and bf16, with the ratios.
# Writes OUT_DIR (default $OUT or gpu-out) /device-check-*.json, torch-*.json, retort-*.json;
# exits 1 when a parity check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=${RETORT_GPU_DIR:-gpu}
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
bin=$gpu/retort
# cudart 13 comes with gpu/; cublas, curand and nvrtc from PyTorch's NVIDIA wheels or the toolkit.
wheel_libs=$(python3 -c 'import glob, os, site
dirs = {d for b in site.getsitepackages() for d in glob.glob(os.path.join(b, "nvidia", "*", "lib"))}
print(":".join(sorted(dirs)))' 2>/dev/null || true)
export LD_LIBRARY_PATH=$gpu/lib:${wheel_libs}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
fail=0
for dtype in f32 bf16; do
  echo "== device-check cuda $dtype"
  timeout 300 "$bin" device-check --fixtures "$gpu/fixtures" --device cuda --dtype "$dtype" --json \
    > "$out/device-check-$dtype.json" || fail=1
  tail -c 2000 "$out/device-check-$dtype.json"; echo
done
for dtype in f32 bf16; do
  torch_dtype=float32; [ "$dtype" = bf16 ] && torch_dtype=bfloat16
  echo "== bench bench-0.5b cuda $dtype: PyTorch, then retort"
  timeout 240 python3 "$gpu/torch_bench.py" --device cuda --dtype "$torch_dtype" \
    --configs bench-0.5b --only train,score,generate > "$out/torch-$dtype.json"
  tail -c 1500 "$out/torch-$dtype.json"; echo
  timeout 240 "$bin" bench --device cuda --dtype "$dtype" --config bench-0.5b \
    --only train,score,generate --compare "$out/torch-$dtype.json" > "$out/retort-$dtype.json"
  tail -c 1500 "$out/retort-$dtype.json"; echo
done
exit $fail
