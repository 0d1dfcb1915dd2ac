"""What a run reports: intervals, calibration, the test split's identity, and seeds that
reproduce (and vary) a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from shard_tools.manifest import samples, split_digest
from tests.helpers import FAST, SMOKE, train


def _predictions(run: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    classes = [k for k in rows[0] if k.startswith("p_")]
    return (np.array([int(r["label"]) for r in rows]),
            np.array([[float(r[c]) for c in classes] for r in rows]))


def _f1_macro(y: np.ndarray, pred: np.ndarray, c: int) -> float:
    """torchmetrics' macro F1: classes with neither support nor predictions are left out."""
    f1 = []
    for k in range(c):
        tp, fp, fn = np.sum((pred == k) & (y == k)), np.sum((pred == k) & (y != k)), \
            np.sum((pred != k) & (y == k))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def test_intervals_contain_the_estimates_and_match_a_plain_recompute(fitted, shards):
    r = json.loads((fitted / "results.json").read_text())
    y, p = _predictions(fitted)
    assert r["num_samples"] == len(y) == 24 and r["bootstrap"]["resamples"] >= 2000
    for k in ("accuracy", "top3", "top5", "f1_macro", "mcc"):
        lo, hi = r["ci95"][k]
        assert lo <= r[k] + 1e-9 and r[k] <= hi + 1e-9, k
    idx = np.random.default_rng(r["bootstrap"]["seed"]).integers(0, len(y), (2000, len(y)))
    pred, top3 = p.argmax(1), (-p).argsort(1)[:, :3]
    acc = [np.mean(pred[i] == y[i]) for i in idx]  # one resample at a time, plainly
    f1 = [_f1_macro(y[i], pred[i], p.shape[1]) for i in idx]
    hit3 = np.array([y[j] in top3[j] for j in range(len(y))])
    for name, values in (("accuracy", acc), ("f1_macro", f1), ("top3", [hit3[i].mean()
                                                                       for i in idx])):
        assert r["ci95"][name] == pytest.approx(np.percentile(values, [2.5, 97.5]), abs=1e-9)
    assert set(r["ci95"]["f1_per_class"]) == set(json.loads(
        (shards / "manifest.json").read_text())["classes"])


def test_ece_matches_a_recompute_and_the_run_names_its_test_split(fitted, shards):
    r = json.loads((fitted / "results.json").read_text())
    y, p = _predictions(fitted)
    conf, correct = p.max(1), p.argmax(1) == y
    bins = np.minimum((conf * 15).astype(int), 14)  # 15 equal-width bins of [0, 1]
    ece = sum(abs(conf[bins == b].mean() - correct[bins == b].mean()) * np.mean(bins == b)
              for b in range(15) if np.any(bins == b))
    assert r["ece"] == pytest.approx(ece, abs=1e-4)
    assert r["calibration"] == {"calibrated_probabilities": False}
    assert r["test_samples_sha256"] == split_digest(samples(shards), ["test"])
    assert r["seed"] == 0 and r["params"] > 1_000_000 and r["image_size"] == 48
    assert (fitted / "reliability.png").stat().st_size > 5000


def test_temperature_scaling_keeps_accuracy_and_lowers_validation_nll(fitted, shards,
                                                                      tmp_path):
    best = next((fitted / "checkpoints").glob("best-*.ckpt"))
    train(["test", "--config", SMOKE, "--data.shards", str(shards), "--ckpt_path", str(best),
           "--model.calibrate", "true", *FAST], tmp_path)
    run = next(tmp_path.glob("runs/*/version_*"))
    r, plain = (json.loads((d / "results.json").read_text()) for d in (run, fitted))
    cal = r["calibration"]
    assert cal["calibrated_probabilities"] and 0.05 <= cal["temperature"] <= 20
    assert cal["val_nll_after"] <= cal["val_nll_before"] + 1e-9
    assert r["accuracy"] == plain["accuracy"] and r["top3"] == plain["top3"]
    p, q = _predictions(run)[1], _predictions(fitted)[1]
    assert (p.argmax(1) == q.argmax(1)).all() and not np.allclose(p, q, atol=1e-3)
    assert cal["test_ece_before"] == pytest.approx(plain["ece"], abs=1e-4)


def test_the_same_seed_reproduces_a_run_and_another_seed_differs(fitted, shards, tmp_path):
    runs = {}
    for seed in (0, 1):
        cwd = tmp_path / str(seed)
        cwd.mkdir()
        train(["fit", "--config", SMOKE, "--data.shards", str(shards), "--trainer.max_epochs",
               "2", "--seed_everything", str(seed), *FAST], cwd)
        runs[seed] = next(cwd.glob("runs/*/version_*"))
        cfg = yaml.safe_load((runs[seed] / "config.yaml").read_text())
        assert cfg["seed_everything"] == seed and cfg["data"]["seed"] is None  # one flag
    same, other = (_predictions(runs[s])[1] for s in (0, 1))
    assert np.array_equal(same, _predictions(fitted)[1])  # fitted: seed 0 too
    assert not np.allclose(other, same, atol=1e-3)
