"""benchmarks/throughput.py --quick: the JSON it writes is complete and every figure positive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_complete_results(shards, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick",
                    "--shards", str(shards), "--out", str(tmp_path)], check=True)
    (path,) = tmp_path.glob("*.json")
    res = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 1000
    assert set(res["loader"]) == {"dali-cpu", "torch-pil", "wds-pil"}
    assert set(res["full_step"]) == {"dali-cpu", "torch-pil", "wds-pil"}
    for mode in ("loader", "full_step"):
        for name, r in res[mode].items():
            for k in ("images_per_s", "p10", "p90", "cpu_s_per_1000", "peak_rss_mb"):
                assert r[k] > 0, (mode, name, k)
            assert r["p10"] <= r["images_per_s"] <= r["p90"]
    assert res["model_only"]["images_per_s"] > 0
    assert set(res["inference"]) == {"pytorch-unfused", "pytorch-fused", "onnxruntime-cpu-fused"}
    assert all(r["images_per_s"] > 0 for r in res["inference"].values())
    assert all(0 <= r["data_wait_share"] <= 1 for r in res["full_step"].values())
    env = res["environment"]
    assert env["cores"] >= 1 and env["torch"] and env["dali"] and env["timm"]
    assert res["data"]["images"] == 96 and res["data"]["bits_per_pixel"] > 1
