#!/usr/bin/env bash
# Issue 15's GPU row: the frontier (outer=diloco-frontier) vs fp32 DiLoCo vs DDP at model=small,
# one seed, every site on the one GPU (scripts/experiments/quality.py --device cuda).
#
# Here, on a machine with pip and the package registries, once:
#     bash scripts/gpu_quality.sh --fetch
# puts into .whl/ (kept out of git) the wheels for Python 3.12 x86_64 that the device image lacks
# (hydra-core, omegaconf, the antlr4 runtime) or may hold older than loco's generated gRPC code
# needs (grpcio, protobuf): about 9 MB.
# There, with .whl carried:
#     bash scripts/gpu_quality.sh [OUT_DIR]
# installs them into /tmp/site, builds the kernels, runs a 40-step smoke federation on cuda, then
# the rows ddp, diloco, frontier-ternary in turn, each with what is left of the budget shared
# among the rows still to run. Results: OUT_DIR/results.jsonl, OUT_DIR/quality.md, a log per step,
# OUT_DIR/summary.txt. Settings (environment): GPU_QUALITY_BUDGET_S (540), GPU_QUALITY_STEPS (1000),
# GPU_QUALITY_BATCH (16), GPU_QUALITY_SEQ (256), GPU_QUALITY_DEVICE (cuda; cpu checks this script
# on a machine without a GPU), GPU_QUALITY_MODEL (small), GPU_QUALITY_ROWS.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch" ]]; then
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        grpcio==1.85.4 protobuf==7.36.2 hydra-core==1.3.8 omegaconf==2.3.1 PyYAML==6.0.4 || exit 1
    # the antlr4 runtime omegaconf pins (4.9.*) is published as a source archive only
    $py -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1
    ls -la .whl
    exit 0
fi

out=${1:-${OUT:-gpu_quality_out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.txt"
: > "$summary"
device=${GPU_QUALITY_DEVICE:-cuda}
budget=${GPU_QUALITY_BUDGET_S:-540}
steps=${GPU_QUALITY_STEPS:-1000}
batch=${GPU_QUALITY_BATCH:-16}
seq=${GPU_QUALITY_SEQ:-256}
model=${GPU_QUALITY_MODEL:-small}
read -ra rows <<< "${GPU_QUALITY_ROWS:-ddp diloco frontier-ternary}"
runs=/tmp/gpu_quality_runs
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >> "$summary" 2>&1 || { echo "wheels: install failed" | tee -a "$summary"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ "$device" == cuda ]] && export LOCO_REQUIRE_EXT=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

source scripts/gpu_step.sh  # step NAME LIMIT_S CMD...

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$summary" 2>&1
$py -c "import sys, torch, grpc, google.protobuf as pb, hydra; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'grpc', grpc.__version__, 'protobuf', pb.__version__, 'hydra', hydra.__version__)" 2>&1 | tee -a "$summary"
step imports 60 $py -c "import loco.worker, loco.local, loco.federation; print('ok')" || exit 1
step build 200 $py -c "from loco.compress import _ext; print('kernels:', _ext.ext_available(), 'cuda:', _ext.ext_has_cuda(), _ext.ext_error())"

quality=($py scripts/experiments/quality.py --device "$device" --model "$model" --batch "$batch"
         --seq-len "$seq" --H 50 --seeds 0 --runs "$runs" --out "$out")
# the smoke: every moving part of the frontier row (4 sites on the device, the sliced reduce,
# the coded deltas over gRPC) in 40 steps; a failure here saves the rows' time
step smoke 120 "${quality[@]}" --H 20 --steps 40 --rows frontier-ternary --timeout 110 \
    --out "$out/smoke" || exit 1
for i in "${!rows[@]}"; do
    left=$((budget - SECONDS - 15))
    share=$((left / (${#rows[@]} - i)))
    step "${rows[$i]}" "$share" "${quality[@]}" --steps "$steps" --rows "${rows[$i]}" --timeout $((share - 15))
done
cat "$out/quality.md" 2>/dev/null | sed -n '/^| row/,/^$/p' | tee -a "$summary"
