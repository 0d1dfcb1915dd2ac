#!/usr/bin/env bash
# One prepared run for a single-GPU machine: GPU tests, then the full benchmark.
#
#   benchmarks/gpu_check.sh [WHEEL_DIR]
#
# The machine has torch, timm, Lightning and torchmetrics but maybe not DALI, and maybe no
# network. WHEEL_DIR holds wheels for whatever is missing, whole or split into parts
# (`split -b 60M x.whl x.whl.part-`), as `benchmarks/fetch_wheels.sh` prepares them on a machine
# with a network. Parts are joined, wheels installed offline, the project installed without
# dependencies. Budget: under 8 minutes on one H200; each step has its own timeout.
# Everything lands in $OUT (default benchmarks/results/gpu): gpu_check.log (all output),
# gpu_tests.txt, and the benchmark JSON/MD/PNG for FastViT-T8 and SA12 at 384 in 16-mixed.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
WHEELS=${1:-}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi"
nproc; python --version

if [ -n "$WHEELS" ]; then
  step "install from $WHEELS"
  for first in "$WHEELS"/*.part-aa; do
    [ -e "$first" ] || continue
    whl=${first%.part-aa}
    cat "$whl".part-* > "$whl" && rm -f "$whl".part-*
  done
  python -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || echo "some wheels failed"
fi
step "install the project (no dependencies: they come from the image or WHEEL_DIR)"
python -m pip install -q --no-deps --no-build-isolation -e . || echo "editable install failed"
python - <<'PY'
import importlib
for m in ("torch", "nvidia.dali", "timm", "lightning", "torchmetrics", "jsonargparse",
          "webdataset", "albumentations", "onnxruntime"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:16s} {getattr(mod, '__version__', 'ok')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{m:16s} MISSING ({exc})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

step "GPU tests (pytest -m gpu)"
timeout 180 python -m pytest -q -m gpu -rs tests/ 2>&1 | tee "$OUT/gpu_tests.txt"

step "benchmark FastViT-T8, 384 px, batch 64, 16-mixed: loaders, model only, full step, inference"
timeout 200 python benchmarks/throughput.py --model fastvit_t8 --batch-size 64 --batches 10 \
  --repeats 3 --no-scaling --out "$OUT" \
  --loaders dali-gpu torch-nvjpeg torch-pil dali-cpu

step "benchmark FastViT-SA12, 384 px, batch 64: model only and full step with the GPU loaders"
timeout 120 python benchmarks/throughput.py --model fastvit_sa12 --batch-size 64 --batches 8 \
  --repeats 3 --no-scaling --no-inference --out "$OUT/sa12" --loaders dali-gpu torch-nvjpeg

step "done"
ls -la "$OUT" "$OUT/sa12" 2>/dev/null
