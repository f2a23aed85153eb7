#!/usr/bin/env bash
# One prepared check of everything CUDA (issue 11 §5), for the minutes a GPU machine is lent:
#   bash scripts/gpu_wheels.sh                               # here, with network: wheels into .whl/
#   bash scripts/gpu_check.sh --wheels .whl --out "$OUT"     # there, from the repository root
# Steps (each time-boxed; a failing one is recorded and the rest still run): env (nvidia-smi, torch),
# install_wheels, imports, build_ops (CUDA op, sm_90), cuda_tests (pytest -m cuda), bench_msda (CUDA
# fp32/fp16/bf16 at the DINO encoder shape), prepare_train + train_amp (tiny preset, bf16 autocast,
# torchrun), nccl (all_reduce through torchrun), bench_labels, bench_precompute, tensorrt_parity.
# Writes OUT/gpu_check.json (every figure; per step ok/failed/timeout/skipped/unavailable, seconds,
# error tail) and OUT/gpu_check.log. Default budget 540 s. `--help` lists the options.
# The project is not pip-installed there (that would pull dependencies from the network): a folder
# holding an `lt_distill` symlink to this checkout goes on PYTHONPATH, after the installed wheels.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
site=/tmp/lt-distill-site
pp=/tmp/lt-distill-pp
mkdir -p "$site" "$pp"
ln -sfn "$repo" "$pp/lt_distill"
export PYTHONPATH="$pp:$site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PATH:$site/bin"  # the ninja wheel's executable, where the machine has none of its own
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/lt-distill-ext}"
export PYTHONUNBUFFERED=1
# lvis imports cv2 at import time (for its drawing helpers only); opencv's wheel is too big to carry,
# so where cv2 is absent a stand-in module that fails on use is installed beside the wheels.
if ! python3 -c "import cv2" 2>/dev/null; then
  stub="$site/cv2.py"
  [ -f "$stub" ] || printf '%s\n' '"""Stand-in for OpenCV on the GPU check machine: lvis imports cv2 only for drawing."""' \
    'def __getattr__(name):' \
    '    raise ImportError(f"cv2.{name}: OpenCV is not installed on this machine")' > "$stub"
fi
exec python3 "$repo/scripts/gpu_check.py" --site "$site" "$@"
