#!/usr/bin/env bash
# One prepared script for a CUDA machine, under 10 minutes. First the headline: a synthetic slide of 1 cm² of
# tissue at 0.5 um/px (20000^2 px, tissue everywhere but a white border) through the original model (ResNet-34,
# six heads, random weights) with every inference setting left to the defaults, end to end, printing wall time,
# GPU utilisation, peak GPU memory and the stage timings (target: under 60 s on one H100/H200). Then model
# throughput (fp32, TF32, fp16, bf16, channels_last; batch 1 and 16), tile throughput (2048-px tile, bf16) and the
# torchvision parity check. The printed results, with the card's name, go into $OUT/benchmarks-gpu.md; bring
# them into docs/benchmarks.md with
#
#     python benchmarks/run_all.py --merge path/to/benchmarks-gpu.md
#
# Usage: [OUT=dir] [PYTHON=python3] [WHEELS=dir] bash benchmarks/gpu.sh
#
# Needs torch with CUDA and the package's dependencies. The package itself runs from src/ (no install). A machine
# without internet that lacks some dependencies can install them from wheels prepared elsewhere:
#     pip download -d .wheels --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#         imagecodecs openslide-python openslide-bin tiffslide shapely 'dask[distributed]' albumentations
# and WHEELS=.wheels (they are installed with --no-index; what is already there is kept).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

if [ -n "${WHEELS:-}" ]; then
  "$py" -m pip install -q --no-index --find-links "$WHEELS" imagecodecs openslide-python openslide-bin tiffslide \
    shapely 'dask[distributed]' albumentations 2>&1 | tail -3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" - <<'EOF'
import importlib.util as u
missing = [m for m in ("torch", "numpy", "scipy", "cv2", "skimage", "tifffile", "imagecodecs", "shapely", "yaml",
                       "click", "tqdm", "openslide", "tiffslide", "lightning", "dask", "psutil") if u.find_spec(m) is None]
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}; missing modules: {missing or 'none'}")
EOF

# run_all.py runs each benchmark with the GPU's utilisation sampled: the 1 cm² slide first (writing the slide
# takes about a minute of it), then the rest in what is left of ~9 minutes
timeout 340 "$py" benchmarks/run_all.py --profile gpu --only wsi_scale --doc "$out/benchmarks-gpu.md"
rc=$?
left=$(( 540 - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
  timeout "$left" "$py" benchmarks/run_all.py --profile gpu --only model_speed --only tile_speed \
    --only torchvision_parity --doc "$out/benchmarks-gpu.md" || rc=$?
fi
echo "gpu.sh: exit $rc after $(( $(date +%s) - start )) s; results in $out/benchmarks-gpu.md"
exit $rc
