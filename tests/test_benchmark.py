"""benchmarks/throughput.py --quick: the JSON it writes is complete and its figures agree with
each other (a full step cannot outrun the model alone, nor the loader alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    model = res["model_only"]["images_per_s"]
    assert model > 0
    for name, r in res["full_step"].items():  # the step is loader + model: never faster than
        assert r["images_per_s"] <= 1.3 * model, name  # the model alone (30%: timing noise)
        assert r["images_per_s"] <= 1.3 * res["loader"][name]["images_per_s"], name
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
