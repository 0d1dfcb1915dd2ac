#!/usr/bin/env bash
# The one prepared run for a single-GPU machine whose image has python3 3.12, torch (CUDA 13),
# torchvision, Lightning, timm, numpy, opencv, pytest, but no DALI, nvImageCodec, nvJPEG or
# jsonargparse, and no network. What it lacks comes as the payload of benchmarks/gpu_payload.py,
# one part per call (an upload carries at most 64 MiB), calls made back to back:
#
#   calls 1..n-1   benchmarks/gpu_check.sh --stage .gpu_payload/cp312   copy the carried part(s)
#                  to $STAGE (/tmp/kvasir-payload), print the machine, exit
#   last call      benchmarks/gpu_check.sh        stage what came along, verify every part
#                  (SHA256SUMS), unpack into python3's own site-packages, install the project
#                  (pip -e, no deps), then the steps below
#   again          benchmarks/gpu_check.sh --rerun [--from STEP]   installed already: steps only
#   no GPU here    PYTHON=VENV/bin/python benchmarks/gpu_check.sh --dry-run   (a venv with
#                  torch, Lightning, timm and no DALI; its payload: gpu_payload.py --python X.Y)
#                  everything up to the import check, then a clean stop before the GPU steps
#
# Steps and timeouts (seconds; 470 in all, ~10 s left for the untimed machine summary and GPU
# probe, within the 8 minutes of the check):
#   stage 10, verify 15, unpack 40, project 25, imports 30   (the last call only: 120)
#   smoke 40      benchmarks/gpu_smoke.py: the DALI GPU graphs, GPU vs CPU, checkpoint round trip
#   pytest 100    python3 -m pytest -m gpu -rs tests/
#   fit 70        kvasir-train fit, FastViT-T8, 384 px, 2 epochs, 16-mixed, DALI on the GPU,
#                 synthetic shards of 8 classes x 40 images, CSV logger only (no wandb there)
#   bench 140     benchmarks/throughput.py: T8 and SA12 at 384, batch 64 and 128; dali-gpu,
#                 torch-nvjpeg, dali-cpu (16 threads): loader only, model only, full step;
#                 dali-gpu at 1, 2 and 4 threads
# The first step that fails ends the run: exit 1 and "FAILED: <step>". --keep-going runs the
# remaining steps instead and exits 1 naming every failed step at the end.
#
# $OUT (default benchmarks/results/gpu) receives at most 8 files: gpu_check.log (everything),
# gpu_tests.txt, fit_metrics.csv, fit_results.json, the benchmark's <machine>-sweep.json/.md.
# PYTHON overrides the interpreter (default python3); KVASIR_PAYLOAD the staging folder,
# KVASIR_CARRIED the carried folder (default .gpu_payload/cp<python>), KVASIR_WORK scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
export PY=${PYTHON:-python3}
export OUT=${OUT:-benchmarks/results/gpu}
export STAGE=${KVASIR_PAYLOAD:-/tmp/kvasir-payload}
export WORK=${KVASIR_WORK:-/tmp/kvasir-gpu-check}
export REPO=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline
# Where the parts ride along inside the uploaded working tree: the folder for this Python.
TAG=cp$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
CARRIED=${KVASIR_CARRIED:-.gpu_payload/$TAG}
MODE=full DRY=0 KEEP=0 FROM="" SRC=""
while [ $# -gt 0 ]; do
  case $1 in
    --stage) MODE=stage SRC=${2:?--stage needs the folder of the carried part(s)}; shift ;;
    --rerun) MODE=rerun ;;
    --dry-run) DRY=1 ;;
    --keep-going) KEEP=1 ;;
    --from) FROM=${2:?--from needs a step: smoke pytest fit bench}; shift ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)  # absolute: some steps run elsewhere
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
T0=$SECONDS
FAILED=()
STARTED=$([ -z "$FROM" ] && echo 1 || echo 0)

finish() {
  echo
  echo "=== [$((SECONDS - T0)) s] end; files in $OUT:"
  ls -la "$OUT"
  if [ ${#FAILED[@]} -gt 0 ]; then echo "FAILED: ${FAILED[*]}"; exit 1; fi
  echo "gpu_check: ${DONE:-all steps passed}"
  exit 0
}

# step NAME TIMEOUT FUNCTION: run FUNCTION (exported, in its own bash) under its timeout.
step() {
  local name=$1 limit=$2 fn=$3 rc=0 t0=$SECONDS
  if [ "$STARTED" = 0 ] && [ "$name" != "$FROM" ]; then
    echo "=== skip $name (--from $FROM)"
    return 0
  fi
  STARTED=1
  echo
  echo "=== [$((SECONDS - T0)) s] $name (timeout $limit s)"
  timeout --kill-after=10 "$limit" bash -c "set -euo pipefail; $fn" || rc=$?
  if [ $rc -eq 0 ]; then echo "--- $name: ok ($((SECONDS - t0)) s)"; return 0; fi
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "--- $name: FAILED, timed out after $limit s"
  else
    echo "--- $name: FAILED (exit $rc) after $((SECONDS - t0)) s"
  fi
  FAILED+=("$name")
  [ $KEEP = 1 ] || finish
}

machine() {
  timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,mig.mode.current \
    --format=csv 2>/dev/null || echo "nvidia-smi: none"
  echo "cores $(nproc), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $("$PY" --version 2>&1)"
  "$PY" - <<'PY'
import importlib.metadata as md, sys, sysconfig
print("python", sys.executable, "purelib", sysconfig.get_paths()["purelib"],
      "scripts", sysconfig.get_paths()["scripts"])
for name in ("torch", "torchvision", "lightning", "timm", "numpy", "setuptools", "psutil",
             "nvidia-dali-cuda130", "jsonargparse", "nvidia-nvjpeg", "albumentations"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
PY
}

stage_from() {  # stage_from DIR: copy the parts, sums and manifest there into $STAGE
  mkdir -p "$STAGE"
  local found=0
  for f in "$1"/payload.tar.xz.part-* "$1"/SHA256SUMS "$1"/manifest.json; do
    [ -f "$f" ] || continue
    cp "$f" "$STAGE/" && found=1
  done
  [ $found = 1 ] || { echo "nothing to stage in $1"; return 1; }
  echo "staged in $STAGE:"; ls -l "$STAGE"
  local name missing=""
  for name in $(awk '!/^#/ && $3 != "payload.tar.xz" {print $3}' "$STAGE/SHA256SUMS"); do
    [ -f "$STAGE/$name" ] || missing="$missing $name"
  done
  echo "parts still to come:${missing:- none, the payload is complete}"
}

s_verify() { "$PY" benchmarks/gpu_payload.py --check "$STAGE"; }
s_unpack() { "$PY" benchmarks/gpu_payload.py --install "$STAGE"; }
s_project() {  # the project without dependencies; they come from the image and the payload
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
}
s_imports() {
  cd "$WORK"  # not the repository: kvasir_dali must come from the install
  "$PY" - <<'PY'
import importlib, sys
bad = []
for m in ("torch", "torchvision", "nvidia.dali", "nvidia.dali.plugin.pytorch", "jsonargparse",
          "timm", "lightning", "torchmetrics", "kvasir_dali.data", "kvasir_dali.cli"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:28s} {getattr(mod, '__version__', 'ok')}")
    except Exception as exc:  # noqa: BLE001
        print(f"  {m:28s} FAILED: {type(exc).__name__}: {exc}")
        bad.append(m)
import torch
print("  cuda", torch.version.cuda, "device:",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
sys.exit(f"imports failed: {bad}" if bad else 0)
PY
}
s_smoke() { "$PY" benchmarks/gpu_smoke.py; }
s_pytest() {
  "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider --continue-on-collection-errors tests/ \
    2>&1 | tee "$OUT/gpu_tests.txt"
}
# wandb is not in the image: the GPU configs' logger list replaced by a CSV logger alone.
CSV_ONLY='[{"class_path": "lightning.pytorch.loggers.CSVLogger",
  "init_args": {"save_dir": "runs", "name": "gpu_check"}}]'
export CSV_ONLY
s_fit() {
  rm -rf "$WORK/fit" && mkdir -p "$WORK/fit" && cd "$WORK/fit"
  "$PY" -m shard_tools.cli synth src --per-class 40 >/dev/null
  "$PY" -m shard_tools.cli build src shards >/dev/null
  "$PY" -m kvasir_dali.cli fit --config "$REPO/configs/fastvit_t8.yaml" --data.shards shards \
    --trainer.max_epochs 2 --data.image_size 384 --trainer.precision 16-mixed \
    --data.device gpu --trainer.enable_progress_bar false --trainer.logger "$CSV_ONLY"
  local run=runs/gpu_check/version_0
  cp "$run/metrics.csv" "$OUT/fit_metrics.csv"
  cp "$run/results.json" "$OUT/fit_results.json"
  "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1]))
print({k: v for k, v in r.items() if not isinstance(v, (dict, list))})' "$run/results.json"
}
s_bench() {
  "$PY" benchmarks/throughput.py --model fastvit_t8 fastvit_sa12 --batch-size 64 128 \
    --image-size 384 --loaders dali-gpu torch-nvjpeg dali-cpu --workers 16 --per-class 80 \
    --warmup 2 --batches 4 --repeats 3 --scaling-loaders dali-gpu --scaling-threads 1 2 4 \
    --no-inference --out "$OUT"
}
export -f stage_from s_verify s_unpack s_project s_imports s_smoke s_pytest s_fit s_bench

echo "=== gpu_check.sh $MODE$([ $DRY = 1 ] && echo ' (dry run)') $(date -u +%FT%TZ), commit" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY"
if [ "$MODE" = stage ]; then
  stage_from "$SRC" || { FAILED+=(stage); finish; }
  machine
  echo "staged: the next call carries the next part (or runs the check with the last one)"
  exit 0
fi
machine
if [ "$MODE" = full ]; then
  if [ -d "$CARRIED" ]; then step stage 10 "stage_from $CARRIED"; fi
  step verify 15 s_verify
  step unpack 40 s_unpack
  rc=0; timeout 25 bash -c s_project || rc=$?
  if [ $rc -ne 0 ]; then
    echo "--- project: pip install -e . FAILED (exit $rc): using PYTHONPATH=$REPO instead;" \
      "console scripts (kvasir-train, used by tests) are then missing"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "--- project: installed (editable)"
  fi
  # tests/helpers.py runs kvasir-train/kvasir-predict from the interpreter's own folder.
  BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
  [ -x "$BIN/kvasir-train" ] || echo "WARNING: no $BIN/kvasir-train: the tests that run the" \
    "tools will fail (console scripts went to $("$PY" -c 'import sysconfig
print(sysconfig.get_paths()["scripts"])'))"
fi
if ! (cd "$WORK" && "$PY" -c 'import kvasir_dali' 2>/dev/null); then
  echo "kvasir_dali is not installed for $PY: using PYTHONPATH=$REPO"
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
step imports 30 s_imports
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  if [ $DRY = 1 ]; then
    echo
    echo "=== dry run: no CUDA GPU on this machine; stopping cleanly before the first" \
      "GPU-only step (smoke)."
    DONE="dry run passed (staging, verification, unpacking, project, imports)" finish
  fi
  echo "FAILED: no CUDA GPU visible to torch"
  FAILED+=(gpu)
  finish
fi
step smoke 40 s_smoke
step pytest 100 s_pytest
step fit 70 s_fit
step bench 140 s_bench
finish
