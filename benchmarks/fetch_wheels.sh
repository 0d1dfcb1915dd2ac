#!/usr/bin/env bash
# Prepare WHEEL_DIR for benchmarks/gpu_check.sh on a machine with a network:
#   benchmarks/fetch_wheels.sh DIR [PYTHON_VERSION]     (default 3.11)
# Downloads the wheels a torch/timm/Lightning image usually lacks (DALI, the baselines' and the
# CLI's libraries) for x86-64 Linux, and splits any wheel over 60 MB into parts so that each can
# travel in a 64 MiB upload.
set -euo pipefail
DIR=${1:?usage: fetch_wheels.sh DIR [PYTHON_VERSION]}
PYV=${2:-3.11}
mkdir -p "$DIR"
python -m pip download -q --only-binary=:all: --platform manylinux2014_x86_64 \
  --python-version "$PYV" -d "$DIR" \
  nvidia-dali-cuda120==2.4.0 "jsonargparse[signatures]>=4.35" "webdataset>=0.2.100" \
  "albumentations>=2.0" "onnxruntime>=1.20" "onnx>=1.17" "onnxscript>=0.2"
for whl in "$DIR"/*.whl; do
  if [ "$(stat -c %s "$whl")" -gt $((60 * 1024 * 1024)) ]; then
    split -b 60M "$whl" "$whl.part-" && rm "$whl"
  fi
done
ls -la "$DIR"
