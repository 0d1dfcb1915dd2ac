"""kvasir-report (kvasir_dali.leaderboard) on run folders built here with known numbers.

The test split: 40 samples, 4 classes (label = i % 4). A run is right on a chosen set of
samples (probability 0.7 on its prediction, 0.1 elsewhere), so accuracy, ECE and the McNemar
counts of every pair of runs are known by construction.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from kvasir_dali import leaderboard
from kvasir_dali.runs import recipe

N, C = 40, 4
CLASSES = ["a", "b", "c", "d"]
SPLIT = "1" * 64  # test_samples_sha256 of the shared split


def make_run(folder: Path, *, name: str, model: str, lr: float, seed: int, right: range,
             f1: float, ips: float | None, params: int, ece: float | None = None,
             split: str = SPLIT, keys_from: int = 1) -> Path:
    """A run folder as kvasir-train writes it, right exactly on the samples in `right`."""
    folder.mkdir(parents=True)
    labels = np.arange(N) % C
    preds = np.where(np.isin(np.arange(N), list(right)), labels, (labels + 1) % C)
    with open(folder / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["key", "label", "pred", *[f"p_{c}" for c in CLASSES]])
        for i in range(N):
            p = [0.1] * C
            p[preds[i]] = 0.7
            w.writerow([f"{keys_from + i:06d}", labels[i], preds[i], *p])
    results = {"model": model, "split": "test", "num_samples": N,
               "accuracy": len(right) / N, "loss": 0.5, "f1_macro": f1, "top3": 0.99,
               "top5": 1.0, "mcc": f1 - 0.1, "per_class": {}, "train_images_per_second": ips,
               "seed": seed, "fold": None, "test_samples_sha256": split, "params": params,
               "image_size": 96, "pretrained": "off"}
    if ece is not None:
        results["ece"] = ece
    (folder / "results.json").write_text(json.dumps(results))
    config = {"seed_everything": seed,
              "trainer": {"max_epochs": 8, "enable_progress_bar": False,
                          "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                      "init_args": {"save_dir": "runs", "name": name}}]},
              "model": {"model_name": model, "pretrained": "off", "lr": lr},
              "data": {"shards": f"/data/copy{seed}/shards", "image_size": 96, "seed": seed,
                       "num_threads": 2 + seed},
              "ckpt_path": None}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture
def runs(tmp_path) -> Path:
    """Configuration A: 3 seeds, accuracies 0.90, 0.85, 0.95 (folder order differs from seed
    order); configuration B: 2 seeds, 0.75, 0.80, no ECE in results.json."""
    root = tmp_path / "runs"
    a = dict(name="expA", model="fastvit_t8", lr=2e-3, params=3_260_000)
    make_run(root / "expA" / "version_0", seed=2, right=range(0, 38), f1=0.94, ips=120.0,
             ece=0.25, **a)
    make_run(root / "expA" / "version_1", seed=0, right=range(0, 36), f1=0.89, ips=100.0,
             ece=0.20, **a)
    make_run(root / "expA" / "version_2", seed=1, right=range(0, 34), f1=0.84, ips=110.0,
             ece=0.15, **a)
    b = dict(name="expB", model="fastvit_sa12", lr=1e-3, params=10_500_000)
    make_run(root / "expB" / "version_0", seed=0, right=range(0, 30), f1=0.70, ips=50.0, **b)
    make_run(root / "expB" / "version_1", seed=1, right=range(4, 36), f1=0.80, ips=None, **b)
    return root


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def test_leaderboard_means_stds_runs_and_pooled_mcnemar_from_known_runs(runs, tmp_path,
                                                                         capsys):
    out = tmp_path / "report"
    assert leaderboard.main([str(runs), "--out", str(out), "--resamples", "500"]) == 0
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png", "comparisons.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = read_csv(out / "leaderboard.csv")
    assert [(r["name"], r["model"], int(r["runs"])) for r in rows] == \
        [("expA", "fastvit_t8", 3), ("expB", "fastvit_sa12", 2)]  # ranked by accuracy
    a, b = rows
    assert float(a["accuracy_mean"]) == pytest.approx(0.90)
    assert float(a["accuracy_std"]) == pytest.approx(0.05)  # sample std (ddof=1) of .85 .90 .95
    assert float(a["f1_macro_mean"]) == pytest.approx(0.89)
    assert float(a["f1_macro_std"]) == pytest.approx(0.05)
    assert float(a["ece_mean"]) == pytest.approx(0.20)  # results.json's values
    assert float(a["train_images_per_second"]) == pytest.approx(110.0)
    assert int(a["params"]) == 3_260_000 and a["seeds"] == "0,1,2"
    assert float(b["accuracy_mean"]) == pytest.approx(0.775)
    assert float(b["accuracy_std"]) == pytest.approx(math.sqrt(0.00125))  # .75, .80
    # No ECE in B's results.json: computed from predictions.csv, |accuracy - 0.7| per run.
    assert float(b["ece_mean"]) == pytest.approx(0.075)
    assert float(b["train_images_per_second"]) == pytest.approx(50.0)  # the run that has it
    assert float(a["accuracy_ci95_lo"]) <= 0.90 <= float(a["accuracy_ci95_hi"])

    (cmp,) = read_csv(out / "comparisons.csv")
    assert (cmp["a"].startswith("expA"), cmp["b"].startswith("expB"), cmp["pairs"]) == \
        (True, True, "2")
    # Pairs by seed: (A seed 0, B seed 0): b = 6, c = 0; (A seed 1, B seed 1): b = 4, c = 2.
    assert (int(cmp["mcnemar_b"]), int(cmp["mcnemar_c"])) == (10, 2)
    exact = 2 * sum(math.comb(12, i) for i in range(3)) / 2**12
    assert float(cmp["mcnemar_p"]) == pytest.approx(exact) == pytest.approx(0.03857421875)
    assert float(cmp["accuracy_diff"]) == pytest.approx(0.90 - 0.775)
    assert 0 < float(cmp["accuracy_diff_ci95_lo"]) < 0.125 < float(cmp["accuracy_diff_ci95_hi"])

    md = (out / "leaderboard.md").read_text()
    assert md.startswith("| Configuration | Model |")
    assert "| 3 | 90.00 ± 5.00 | 0.8900 ± 0.0500 |" in md
    assert "| 2 | 77.50 ± 3.54 |" in md
    assert "| 10 / 2 | 0.0386 |" in md
    assert "| 3 | 90.00 ± 5.00 |" in capsys.readouterr().out


def test_single_run_configuration_has_no_std(runs, tmp_path):
    out = tmp_path / "report"
    assert leaderboard.main([str(runs / "expB" / "version_0"), "--out", str(out),
                             "--resamples", "200"]) == 0
    (row,) = read_csv(out / "leaderboard.csv")
    assert row["runs"] == "1" and row["accuracy_std"] == "" and \
        float(row["accuracy_mean"]) == pytest.approx(0.75)
    md = (out / "leaderboard.md").read_text()
    assert "| 75.00 ± — |" in md and "nothing to compare" in md


def test_recipe_ignores_what_varies_between_repeats_but_not_the_recipe():
    base = {"seed_everything": 0, "model": {"lr": 1e-3}, "data": {"shards": "a", "seed": 0},
            "trainer": {"logger": [{"init_args": {"name": "x"}}]}}
    other = {"seed_everything": 5, "model": {"lr": 1e-3}, "data": {"shards": "b", "seed": 5,
                                                                   "fold": 3},
             "trainer": {"logger": False, "default_root_dir": "/tmp"}, "ckpt_path": "last"}
    changed = {**base, "model": {"lr": 2e-3}}
    assert recipe(base)[0] == recipe(other)[0]
    assert recipe(base)[0] != recipe(changed)[0]
    assert recipe(base)[1] == "x"


def test_runs_of_different_test_splits_are_refused_naming_the_folders(runs, tmp_path, capsys):
    other = make_run(tmp_path / "elsewhere" / "version_0", name="expC", model="fastvit_t8",
                     lr=2e-3, seed=0, right=range(0, 20), f1=0.5, ips=1.0, params=1,
                     split="2" * 64)
    out = tmp_path / "report"
    assert leaderboard.main([str(runs), str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvasir-report: error:") and "\n" not in err
    assert str(other) in err and "expA" in err and "--allow-different-tests" in err
    assert not (out / "leaderboard.md").exists()

    assert leaderboard.main([str(runs), str(other), "--out", str(out), "--resamples", "200",
                             "--allow-different-tests"]) == 0
    rows = read_csv(out / "leaderboard.csv")
    assert [r["name"] for r in rows] == ["expA", "expB", "expC"]
    assert [(c["a"][:4], c["b"][:4]) for c in read_csv(out / "comparisons.csv")] == \
        [("expA", "expB")]  # expC shares no split: compared with nothing


def test_runs_without_a_split_hash_are_matched_by_their_sample_lists(runs, tmp_path, capsys):
    # An older run without test_samples_sha256 on other samples (keys 101...): refused too.
    old = make_run(tmp_path / "old" / "version_0", name="expA", model="fastvit_t8", lr=2e-3,
                   seed=0, right=range(0, 36), f1=0.89, ips=1.0, params=1, keys_from=101)
    results = json.loads((old / "results.json").read_text())
    del results["test_samples_sha256"]
    (old / "results.json").write_text(json.dumps(results))
    assert leaderboard.main([str(runs), str(old), "--out", str(tmp_path / "r")]) == 2
    assert str(old) in capsys.readouterr().err
    # The same samples as the others: compared as one split.
    (old / "predictions.csv").write_text((runs / "expB" / "version_0" /
                                          "predictions.csv").read_text())
    results["accuracy"] = 0.75
    (old / "results.json").write_text(json.dumps(results))
    assert leaderboard.main([str(runs), str(old), "--out", str(tmp_path / "r"),
                             "--resamples", "200"]) == 0


@pytest.mark.parametrize("damage, expect", [
    ("missing_dir", "does not exist"),
    ("empty_dir", "no run folder"),
    ("no_predictions", "predictions.csv is missing"),
    ("bad_json", "results.json is unreadable"),
    ("bad_csv", "predictions.csv"),
    ("mismatch", "not from the same test"),
])
def test_user_errors_are_one_line_and_exit_2(runs, tmp_path, capsys, damage, expect):
    run = runs / "expB" / "version_0"
    target = {"missing_dir": tmp_path / "nope", "empty_dir": tmp_path / "empty"}.get(damage, run)
    if damage == "empty_dir":
        target.mkdir()
    elif damage == "no_predictions":
        (run / "predictions.csv").unlink()
    elif damage == "bad_json":
        (run / "results.json").write_text("{not json")
    elif damage == "bad_csv":
        (run / "predictions.csv").write_text("key,label,pred,p_a\n000001,zero,0,1.0\n")
    elif damage == "mismatch":
        r = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**r, "accuracy": 0.5}))
    assert leaderboard.main([str(target), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvasir-report: error:") and "\n" not in err, err
    assert expect in err and "Traceback" not in err
