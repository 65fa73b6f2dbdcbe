#!/usr/bin/env bash
# One-GPU benchmark (H100/H200 class, under 8 minutes), figures as JSON in OUT_DIR (default bench_out/gpu):
# ViT-B/16 step time and MFU (bf16; DDP and FSDP2; activation checkpointing off and on), gradient-cache
# time ratio at 8x batch, tiled vs dense loss at 32k-64k, loader samples/s with CPU decode and, where
# clipscale has data.decode_device=cuda, GPU decode. The cases are python -m benchmarks.gpu (see there).
#   benchmarks/gpu.sh [OUT_DIR]        from a fresh checkout; sets up .venv as ./quickstart.sh does
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out/gpu}
if [[ ! -x .venv/bin/python ]]; then
  echo "[gpu.sh] installing clipscale into .venv" >&2
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e .
fi
if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
  echo "[gpu.sh] no GPU (nvidia-smi failed); 'python -m benchmarks.gpu --profile tiny --device cpu --out DIR'" \
       "runs the same cases at toy sizes on CPU" >&2
  exit 2
fi
.venv/bin/python -m benchmarks.gpu --profile gpu --device cuda --out "$out"
echo "[gpu.sh] figures: $out/summary.json (each case's JSON next to it)" >&2
