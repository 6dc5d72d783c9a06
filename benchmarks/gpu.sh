#!/usr/bin/env bash
# One prepared script for a GPU machine (a few minutes): model throughput in fp32/bf16/fp16/channels_last at
# batch 1 and 16, and the torchvision parity check. Needs torch (CUDA), numpy, click, pyyaml, tqdm.
# Writes JSON results to ${OUT:-.}/. Usage: bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/torchvision_parity.py
python3 benchmarks/model_speed.py --device cuda --batch-size 1 --repeats 20 --warmup 5 --json "$out/model_speed_cuda_b1.json"
python3 benchmarks/model_speed.py --device cuda --batch-size 16 --repeats 10 --warmup 3 --json "$out/model_speed_cuda_b16.json"
