"""benchmarks/throughput.py --quick: the JSON it writes is complete, its data description
agrees with an independent recompute from samples.csv, and a loader whose library is missing
is reported while the others still run. (Speed itself is measured, not asserted: timings on a
shared machine are not a test.)"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_complete_results(shards, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick",
                    "--shards", str(shards), "--out", str(tmp_path)], check=True, timeout=1800)
    (path,) = tmp_path.glob("*.json")
    res = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 1000
    assert set(res["loader"]) == {"dali-cpu", "torch-pil", "wds-pil"}
    assert set(res["full_step"]) == {"dali-cpu", "torch-pil", "wds-pil"}
    for mode in ("loader", "full_step"):
        for name, r in res[mode].items():
            for k in ("images_per_s", "p10", "p90", "cpu_s_per_1000", "peak_rss_mb"):
                assert r[k] > 0, (mode, name, k)
    assert res["model_only"]["images_per_s"] > 0
    rows = list(csv.DictReader(open(shards / "samples.csv")))
    pixels = sum(int(r["packed_width"]) * int(r["packed_height"]) for r in rows)
    bpp = 8 * sum(int(r["packed_bytes"]) for r in rows) / pixels
    assert res["data"]["bits_per_pixel"] == pytest.approx(bpp, rel=1e-9)
    sizes = Counter(f"{r['packed_width']}x{r['packed_height']}" for r in rows)
    assert res["data"]["sizes"] == dict(sizes)
    assert set(res["inference"]) == {"pytorch-unfused", "pytorch-fused", "onnxruntime-cpu-fused"}
    assert all(r["images_per_s"] > 0 for r in res["inference"].values())
    assert all(0 <= r["data_wait_share"] <= 1 for r in res["full_step"].values())
    env = res["environment"]
    assert env["cores"] >= 1 and env["torch"] and env["dali"] and env["timm"]
    assert res["data"]["images"] == 96 and res["data"]["bits_per_pixel"] > 1


def test_a_loader_whose_library_is_missing_is_reported_and_the_others_still_run(shards,
                                                                                 tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "albumentations.py").write_text("raise ImportError('albumentations is absent here')")
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick",
                    "--shards", str(shards), "--out", str(tmp_path / "out"), "--loaders",
                    "dali-cpu", "torch-pil", "--no-inference"], check=True, timeout=1800, env=env)
    res = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert "albumentations is absent here" in res["loader"]["torch-pil"]["error"]
    assert res["loader"]["dali-cpu"]["images_per_s"] > 0
    assert res["full_step"]["dali-cpu"]["images_per_s"] > 0
