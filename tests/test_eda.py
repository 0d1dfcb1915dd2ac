"""kvasir-shard eda and kvasir-train preview: counts, statistics and pictures."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kvasir_dali.data import KvasirDataModule
from kvasir_dali.pipeline import PipeSpec
from kvasir_dali.preview import _first_of_each_class, _images
from shard_tools.build import BuildSpec, build
from shard_tools.cli import main as shard_main
from tests.helpers import SMOKE, run_tool


@pytest.fixture(scope="module")
def eda_out(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eda")
    assert shard_main(["eda", str(synth_dir), "--out", str(out), "--workers", "2"]) == 0
    return out


def test_eda_counts_and_statistics_match_the_folder(synth_dir, eda_out):
    e = json.loads((eda_out / "eda.json").read_text())
    files = sorted(synth_dir.rglob("*.jpg"))
    assert e["images"] == e["files"] == len(files) == 96
    assert e["classes"] == {p.name: 12 for p in sorted(synth_dir.iterdir())}
    sizes = Counter(f"{w}x{h}" for w, h in (Image.open(f).size for f in files))
    assert {r["size"]: r["count"] for r in e["resolutions"]} == dict(sizes)
    assert e["modes"] == {"RGB": 96} and e["would_reject"] == []
    # Mean and std recomputed pixel by pixel, independently of the histograms.
    total, sq, n = np.zeros(3), np.zeros(3), 0
    for f in files:
        x = np.asarray(Image.open(f).convert("RGB"), np.float64).reshape(-1, 3) / 255
        total += x.sum(0)
        sq += (x**2).sum(0)
        n += len(x)
    mean = total / n
    assert e["mean"] == pytest.approx(mean.tolist(), abs=1e-4)
    assert e["std"] == pytest.approx(np.sqrt(sq / n - mean**2).tolist(), abs=1e-4)
    sizes_bytes = sorted(f.stat().st_size for f in files)
    assert e["file_bytes"]["max"] == sizes_bytes[-1] and e["file_bytes"]["min"] == sizes_bytes[0]
    assert "| polyps | 12 | 0 |" in (eda_out / "eda.md").read_text()


def test_eda_pictures_are_valid_images_of_sensible_size(eda_out):
    expected = {"grid.png": (600, 800), "resolutions.png": (400, 200),
                "colours.png": (600, 300)}
    for name, (min_w, min_h) in expected.items():
        img = Image.open(eda_out / name)
        img.verify()
        w, h = Image.open(eda_out / name).size
        assert min_w <= w <= 3000 and min_h <= h <= 3000, (name, w, h)
        assert (eda_out / name).stat().st_size < 400_000, name  # small enough to commit
    assert Image.open(eda_out / "grid.png").size[1] == 8 * 110  # one row per class


def test_eda_reports_what_build_would_reject_and_convert(hostile, tmp_path):
    assert shard_main(["eda", str(hostile), "--out", str(tmp_path / "eda")]) == 0
    e = json.loads((tmp_path / "eda" / "eda.json").read_text())
    m = build(BuildSpec(src=str(hostile), out=str(tmp_path / "out"), workers=2,
                        val_fraction=0.0, test_fraction=0.0)).manifest
    assert {r["path"]: r["reason"] for r in e["would_reject"]} == \
        {r["path"]: r["reason"] for r in m.rejected}
    assert e["would_convert"] == m.converted
    assert e["files"] == m.source_files == 16


def test_preview_renders_a_grid_on_cpu(shards, tmp_path):
    out = tmp_path / "preview.png"
    res = run_tool("kvasir-train", ["preview", "--config", SMOKE, "--data.shards", str(shards),
                                    "--data.image_size", "64", "--out", str(out),
                                    "--samples", "4", "--versions", "3"], cwd=tmp_path)
    assert str(out) in res.stdout
    img = Image.open(out)
    img.verify()
    w, h = Image.open(out).size
    assert 250 <= w <= 1500 and 300 <= h <= 1500


def test_preview_samples_differ_from_the_original_and_each_other(shards, tmp_path):
    dm = KvasirDataModule(str(shards), image_size=64, device="cpu")
    files = dm.shard_set.files("train")
    picked = _first_of_each_class(files.tars[0], files.indexes[0], files.components, 8)
    labels = [p[1] for p in picked]
    assert len(set(labels)) == len(labels) >= 2
    path = tmp_path / "x.jpg"
    path.write_bytes(picked[0][2])
    base = PipeSpec(tars=[], indexes=[], batch_size=1, image_size=64, mean=(0.5,) * 3,
                    std=(0.25,) * 3, train=False, files=(str(path),))
    original = _images(base)
    augmented = _images(PipeSpec(**{**base.__dict__, "train": True, "batch_size": 4,
                                    "files": (str(path),) * 4}))
    assert original.shape == (1, 64, 64, 3) and augmented.shape == (4, 64, 64, 3)
    assert original.dtype == np.uint8
    reference = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.BILINEAR))
    # Normalization undone: the evaluation view is the picture itself.
    assert np.abs(original[0].astype(int) - reference).mean() < 6
    assert len({a.tobytes() for a in augmented}) == 4
    assert all(not np.array_equal(a, original[0]) for a in augmented)
