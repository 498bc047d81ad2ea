#!/usr/bin/env bash
# The GPU checks, in one call on a machine with a CUDA torch and nvcc (see docs/BENCHMARKS.md):
# builds the CUDA kernels, runs the CUDA and engine tests, then the GPU benchmarks.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (results: OUT_DIR/*.json, OUT_DIR/*.log)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
py=${PYTHON:-python}
export LOCO_REQUIRE_EXT=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
$py -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$out/torch.txt"
$py -m pytest -q tests/compress/test_cuda.py 2>&1 | tail -20 | tee "$out/test_cuda.log"
$py scripts/bench/compress.py --device cuda > "$out/compress_cuda.json" 2> "$out/compress_cuda.log"
$py scripts/bench/zero_step.py --device cuda --world 1 > "$out/zero_step_cuda.json" 2> "$out/zero_step_cuda.log"
tail -n 3 "$out"/*.json
