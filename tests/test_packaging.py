"""A wheel of the repository installs as a library: the base install packs shards without torch
or DALI, the experiment configs ship inside the package, and the training commands say which
extra they need instead of failing with a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (requires-python allows it): the same parser
    tomllib = pytest.importorskip("tomli")


def _run(cmd: list, cwd: Path = Path("/")) -> subprocess.CompletedProcess:
    """Outside the repository: `python -c` would import the checkout, not the install."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900,
                          cwd=cwd)


def test_pyproject_states_lower_bounds_and_constraints_pin_exactly():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every = meta["dependencies"] + [d for ds in meta["optional-dependencies"].values()
                                    for d in ds]
    assert not [d for d in every if "==" in d], "exact pins belong in constraints.txt"
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name in ("torch", "torchvision", "lightning", "timm", "nvidia-dali-cuda130", "numpy"):
        assert name in pins, name
    assert int(pins["numpy"].split(".")[0]) >= 2


@pytest.fixture(scope="module")
def base_install(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel and its base dependencies only."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist",
                  ROOT])
    assert built.returncode == 0, built.stderr[-3000:]
    base = getattr(sys, "_base_executable", sys.executable)
    assert _run([base, "-m", "venv", tmp / "venv"]).returncode == 0
    wheel = next((tmp / "dist").glob("kvasir_dali-*.whl"))
    done = _run([tmp / "venv" / "bin" / "python", "-m", "pip", "install", "-q", wheel])
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "venv"


def test_the_base_wheel_packs_shards_without_torch(base_install, tmp_path):
    py, bin_ = base_install / "bin" / "python", base_install / "bin"
    assert _run([py, "-c", "import torch"]).returncode != 0  # really absent
    assert _run([py, "-c", "import nvidia.dali"]).returncode != 0
    for cmd in (["synth", tmp_path / "src", "--per-class", "3", "--workers", "2"],
                ["build", tmp_path / "src", tmp_path / "out", "--val-fraction", "0.34",
                 "--test-fraction", "0.34", "--workers", "2"],
                ["verify", tmp_path / "out"]):
        res = _run([bin_ / "kvasir-shard", *cmd])
        assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_configs_ship_in_the_wheel_and_training_commands_name_the_extra(base_install):
    py = base_install / "bin" / "python"
    res = _run([py, "-c", "import kvasir_dali, pathlib; p = pathlib.Path(kvasir_dali.__file__)"
                ".parent / 'configs'; print(sorted(x.name for x in p.glob('*.yaml')))"])
    assert "fastvit_t8.yaml" in res.stdout and "cpu_smoke.yaml" in res.stdout, res.stderr
    res = _run([base_install / "bin" / "kvasir-train", "fit", "--config", "fastvit_t8"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "pip install 'kvasir-dali[train,cu13]'" in res.stderr
