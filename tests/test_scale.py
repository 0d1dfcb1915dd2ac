"""benchmarks/scale.py --quick: every step is measured at every N, in its own process, and the
results files hold what the closing notes quote (times, peaks, growth exponents)."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "scale.py"
OLD_COMMIT = "742a8a4"  # the version before bounded memory and the indexed duplicate search
QUICK_N = {"tiny": [96, 192], "bytes": [16, 32], "dup": [400, 800]}

pytestmark = pytest.mark.slow


def _quick(tmp: Path, *args: str) -> tuple[dict, Path]:
    out = tmp / "out"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work",
                    str(tmp / "work"), "--timeout", "120", *args], check=True, timeout=300,
                   capture_output=True)
    (path,) = out.glob("scale-*-quick.json")
    return json.loads(path.read_text()), path


def _rows(doc: dict, set_name: str, step: str, code: str) -> dict[int, dict]:
    return {r["n"]: r for r in doc["rows"]
            if (r["set"], r["step"], r["code"]) == (set_name, step, code)}


def _check_step(doc: dict, set_name: str, step: str, code: str) -> None:
    rows = _rows(doc, set_name, step, code)
    assert sorted(rows) == QUICK_N["dup" if step == "dup" else set_name], (set_name, step, code)
    for n, r in rows.items():
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["peak_self_mb"] > 20, r
        if step in ("build", "eda"):  # the steps with worker processes
            assert r["peak_workers_mb"] > 20, r
        if step == "build":
            assert r["packed"] == n, r
    (e,) = [e for e in doc["exponents"] if (e["set"], e["step"], e["code"]) ==
            (set_name, step, code)]
    for key in ("time_exp", "time_exp_last", "peak_exp", "peak_exp_last"):
        assert isinstance(e[key], float) and math.isfinite(e[key]), (e, key)


def test_quick_run_measures_every_step_at_every_n(tmp_path):
    doc, path = _quick(tmp_path)
    for set_name in ("tiny", "bytes"):
        for step in ("build", "verify", "eda", "loader"):
            _check_step(doc, set_name, step, "new")
    _check_step(doc, "tiny", "dup", "new")
    for r in _rows(doc, "bytes", "loader", "new").values():  # one whole epoch, batches of 8
        assert r["images"] > 0 and r["images"] % 8 == 0 and r["images"] <= r["split"], r
    # The first 800 hashes hold one planted near duplicate (a re-encode) per class.
    assert _rows(doc, "tiny", "dup", "new")[800]["groups"] == 8
    realism = doc["hash_realism"]
    assert realism["tiny"]["mean_pair_bits"] > 64 and realism["synth_frames"]["images"] == 32
    assert doc["environment"]["cores"] >= 1 and "shared" in doc["note"]
    assert path.with_suffix(".png").stat().st_size > 10_000
    assert "| build | 192 |" in path.with_suffix(".md").read_text()


def _old_checkout(dest: Path) -> Path:
    """The previous version's packages, from git's objects (nothing in the work tree changes)."""
    try:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_COMMIT, "shard_tools",
                              "kvasir_dali"], capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"commit {OLD_COMMIT} is not in this checkout's git history")
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    return dest


def test_quick_run_compares_the_old_code_with_the_new(tmp_path):
    old = _old_checkout(tmp_path / "old")
    doc, _ = _quick(tmp_path, "--old", str(old), "--sets", "tiny", "--steps", "build",
                    "verify", "dup")
    assert set(doc["environment"]["git_commit"]) == {"old", "new"}
    for code in ("old", "new"):
        for step in ("build", "verify"):
            _check_step(doc, "tiny", step, code)
        _check_step(doc, "tiny", "dup", code)
    old_dup, new_dup = _rows(doc, "tiny", "dup", "old"), _rows(doc, "tiny", "dup", "new")
    for n in QUICK_N["dup"]:  # the indexed search finds exactly what comparing all pairs finds
        assert old_dup[n]["groups"] == new_dup[n]["groups"]
        assert old_dup[n]["grouped"] == new_dup[n]["grouped"]
