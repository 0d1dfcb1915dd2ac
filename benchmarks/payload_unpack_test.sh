#!/usr/bin/env bash
# The GPU payload, tested on a machine without a GPU: a fresh CPython 3.12 venv that has only
# what the GPU image is assumed to have of DALI's and shard_tools' needs (numpy, Pillow, tqdm),
# the payload unpacked into its own site-packages by the very command gpu_check.sh runs, the
# project put on the path, then tiny synthetic shards through the project's CPU DALI graph
# (training and evaluation), and jsonargparse imported.
#
#   benchmarks/payload_unpack_test.sh [PAYLOAD_DIR] [VENV]
#       PAYLOAD_DIR  parts, SHA256SUMS, manifest.json (default .gpu_payload/cp312)
#       VENV         recreated (default /tmp/kvasir-payload-venv); PY312=... picks the Python
set -euo pipefail
cd "$(dirname "$0")/.."
PAYLOAD=${1:-.gpu_payload/cp312}
VENV=${2:-/tmp/kvasir-payload-venv}
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}
WORK=$(mktemp -d /tmp/kvasir-unpack-test.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
step() { echo; echo "=== [$SECONDS s] $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

step "fresh venv $VENV from $PY312"
rm -rf "$VENV"
"$PY312" -m venv "$VENV" || fail "venv"
PY=$VENV/bin/python
"$PY" -m pip install -q --disable-pip-version-check numpy Pillow tqdm \
  || fail "pip install numpy Pillow tqdm"
"$PY" -c 'import numpy, PIL, tqdm; print("numpy", numpy.__version__, "Pillow", PIL.__version__)'

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
step "unpack the payload into $SITE (the command gpu_check.sh runs)"
t0=$(date +%s.%N)
"$PY" benchmarks/gpu_payload.py --install "$PAYLOAD" || fail "payload install"
awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "unpack: %.1f s (check + unpack)\n", b - a}'
du -sh "$SITE"

step "the project: pip install --no-deps --no-build-isolation -e . (as on the GPU)"
if "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/pip.log" 2>&1; then
  echo "editable install: ok"
else
  tail -3 "$WORK/pip.log"
  echo "editable install FAILED (this venv has no setuptools; the GPU image has, torch needs it):"
  echo "using PYTHONPATH=$PWD instead"
  export PYTHONPATH=$PWD
fi

step "tiny synthetic shards"
"$PY" -m shard_tools.cli synth "$WORK/src" --per-class 4 >/dev/null || fail "synth"
"$PY" -m shard_tools.cli build "$WORK/src" "$WORK/shards" --val-fraction 0.25 \
  --test-fraction 0.25 >/dev/null || fail "build"
ls "$WORK/shards"

step "one batch of the CPU DALI graph (train and eval), jsonargparse"
"$PY" - "$WORK/shards" <<'PY' || fail "DALI CPU graph"
import sys, time
import jsonargparse
import nvidia.dali as dali
from kvasir_dali.pipeline import PipeSpec, build_pipeline
from kvasir_dali.shards import ShardSet

print("nvidia.dali", dali.__version__, "from", dali.__file__)
print("jsonargparse", jsonargparse.__version__)
s = ShardSet.open(sys.argv[1])
for split, train in (("train", True), ("val", False)):
    f = s.files(split)
    t0 = time.time()
    pipe = build_pipeline(PipeSpec(tars=f.tars, indexes=f.indexes, batch_size=4, image_size=64,
                                   mean=(0.5,) * 3, std=(0.5,) * 3, train=train, device="cpu",
                                   device_id=None, num_threads=2))
    images, labels = pipe.run()
    x, y = images.as_array(), labels.as_array()
    print(f"{split}: images {x.shape} {x.dtype}, labels {y.shape} {y.dtype} "
          f"({time.time() - t0:.1f} s)")
    assert x.shape == (4, 3, 64, 64) and y.shape == (4, 2), (x.shape, y.shape)
PY
step "PASS"
