#!/usr/bin/env bash
# The GPU checks, in one call on a machine with a CUDA torch and nvcc (figures: docs/BENCHMARKS.md).
# Builds the CUDA kernels, runs the CUDA tests of the kernels and of the engine, then the GPU
# benchmarks. Needs only torch, numpy, pytest (+ pytest-timeout, hypothesis): no hydra, no gRPC.
# Every step has its own time limit, so one that hangs cannot eat the others' time.
# Usage: [GPU_CHECK_ONLY='build bench_compress'] bash scripts/gpu_check.sh [OUT_DIR]   (results: OUT_DIR/summary.txt and a log per step;
# each benchmark's JSON line is the last line starting with '{' of its log)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export LOCO_REQUIRE_EXT=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
summary="$out/summary.txt"
: > "$summary"

budget=${GPU_CHECK_BUDGET_S:-540}  # the whole script; each step's limit is cut to what is left
STEP_ONLY=${GPU_CHECK_ONLY:-}
source scripts/gpu_step.sh  # step NAME LIMIT_S CMD...

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$summary" 2>&1
$py -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$summary"

# 1. build the kernels (CPU + CUDA) once, so the later steps only load them (~1-2 min)
step build 200 $py -c "import loco.compress as lc; from loco.compress import _ext; assert _ext.ext_available(), _ext.ext_error(); print('cuda kernels:', _ext.ext_has_cuda(), _ext.ext_error())"
PYTEST=($py -m pytest -q -p no:cacheprovider -o addopts= --timeout 120)
# 2. kernels: CUDA == reference bitwise, every codec, paths, tails, statuses, API round trip
step test_compress_cuda 120 "${PYTEST[@]}" tests/compress/test_cuda.py
# 3. kernel bandwidth beside the device's own copy (one JSON line; *_bw_vs_copy is the goal's ratio)
step bench_compress 120 $py scripts/bench/compress.py --device cuda
# 4. engine on CUDA: NCCL world 1 stages 0-3 == plain, gloo with CUDA tensors, offload parity + CPU step
step test_engine_cuda 150 "${PYTEST[@]}" -m "not slow" -s tests/engine/test_cuda.py
# 5. bf16 step time of stages 0-3 (+ offload) beside DDP and FSDP2 on one GPU (one JSON line)
step bench_zero_step 120 $py scripts/bench/zero_step.py --device cuda --world 1 --dtype bf16 --model small --batch 16 --seq-len 256 --rounds 20
# 5b. MoE on CUDA: routing, dispatch and combine == CPU; stage 3 over a one-rank NCCL group
step test_moe_cuda 60 "${PYTEST[@]}" tests/moe/test_cuda.py
# 6. if time is left: kernel bandwidth at 4x the size (launch/sync cost matters less)
step bench_compress_256m 100 $py scripts/bench/compress.py --device cuda --numel 268435456 --codecs int8,int4,fp4,bf16
# at most 8 files come back from the device machine: summary.txt + one log per step
cat "$summary"
