"""kvasir-train: the real CLI and configs on generated shards, metrics, resume, weights, DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

from kvasir_dali.model import WeightsError, create_model
from kvasir_dali.module import KvasirClassifier
from kvasir_dali.report import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "cpu_smoke.yaml")
TRAIN = str(Path(sys.executable).parent / "kvasir-train")
FAST = ["--data.image_size", "48", "--data.batch_size", "16", "--trainer.enable_progress_bar",
        "false", "--trainer.log_every_n_steps", "1"]


def train(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([TRAIN, *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and res.returncode:
        raise AssertionError(f"kvasir-train failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


@pytest.fixture(scope="module")
def fitted(shards, tmp_path_factory) -> Path:
    """One short fit (which then tests the best checkpoint) through the real CLI."""
    cwd = tmp_path_factory.mktemp("fit")
    train(["fit", "--config", SMOKE, "--data.shards", str(shards), "--trainer.max_epochs", "2",
           *FAST], cwd)
    return cwd / "runs" / "cpu_smoke" / "version_0"


def recompute(pred_csv: Path, classes: list[str]) -> dict:
    """Metrics from predictions.csv with numpy alone (independent of torchmetrics)."""
    rows = list(csv.DictReader(open(pred_csv)))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    pred = p.argmax(1)
    assert (pred == np.array([int(r["pred"]) for r in rows])).all()
    rank = (-p).argsort(1)
    topk = lambda k: float(np.mean([y[i] in rank[i, :k] for i in range(len(y))]))  # noqa: E731
    n = len(classes)
    cm = np.zeros((n, n), int)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm).astype(float)
    prec = np.divide(tp, cm.sum(0), out=np.zeros(n), where=cm.sum(0) > 0)
    rec = np.divide(tp, cm.sum(1), out=np.zeros(n), where=cm.sum(1) > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(n), where=(prec + rec) > 0)
    t, s = cm.sum(1), cm.sum(0)
    c, total = tp.sum(), cm.sum()
    denom = np.sqrt((total**2 - (s**2).sum()) * (total**2 - (t**2).sum()))
    mcc = (c * total - (s * t).sum()) / denom if denom else 0.0
    loss = float(np.mean(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1))))
    return {"accuracy": float(np.mean(pred == y)), "top3": topk(3), "top5": topk(5),
            "f1_macro": float(f1.mean()), "mcc": float(mcc), "f1": f1, "loss": loss,
            "n": len(y)}


def test_fit_then_test_writes_results_that_predictions_csv_reproduces(fitted, shards):
    results = json.loads((fitted / "results.json").read_text())
    classes = json.loads((shards / "manifest.json").read_text())["classes"]
    again = recompute(fitted / "predictions.csv", classes)
    assert results["num_samples"] == again["n"] == 24 and results["split"] == "test"
    for k in ("accuracy", "top3", "top5", "f1_macro", "mcc"):
        assert results[k] == pytest.approx(again[k], abs=1e-5), k
    assert results["loss"] == pytest.approx(again["loss"], abs=1e-3)  # probs rounded to 1e-6
    for i, c in enumerate(classes):
        assert results["per_class"][c]["f1"] == pytest.approx(again["f1"][i], abs=1e-5)
        assert results["per_class"][c]["support"] == 3
    assert results["train_images_per_second"] > 0
    for name in ("config.yaml", "metrics.csv", "results.md", "confusion_matrix.png",
                 "curves.png", "checkpoints/last.ckpt"):
        assert (fitted / name).is_file(), name
    assert list((fitted / "checkpoints").glob("best-*.ckpt"))
    assert "| Model | Accuracy | loss | F1-Score | Top-3 | Top-5 |" in (fitted / "results.md").read_text()
    cols = next(csv.reader(open(fitted / "metrics.csv")))
    assert {"train/images_per_sec", "train/data_wait", "val/f1_macro"} <= set(cols)


def test_checkpoint_loads_weights_only(fitted):
    ckpt = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["class_names"][0] == "dyed-lifted-polyps"
    assert any(k.startswith("model.") for k in ckpt["state_dict"])


def test_resume_from_last_continues_to_the_requested_epochs(fitted, shards):
    cwd = fitted.parent.parent.parent
    train(["fit", "--config", SMOKE, "--data.shards", str(shards), "--trainer.max_epochs", "3",
           "--ckpt_path", "last", *FAST], cwd)
    rows = read_metrics(fitted)
    epochs = sorted(int(r["epoch"]) for r in rows if r.get("val/accuracy"))
    ckpt = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 2  # resumed in the same run folder and reached max_epochs
    assert epochs == [0, 1, 2]  # the resumed run added exactly one epoch


def test_typo_in_a_key_is_an_error_naming_it(shards, tmp_path):
    res = train(["fit", "--config", SMOKE, "--data.shards", str(shards), "--model.lrr", "0.1"],
                tmp_path, check=False)
    assert res.returncode != 0 and "lrr" in res.stderr


def test_hub_weights_offline_fail_fast_with_advice(monkeypatch):
    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="--model.pretrained /path/to/model.safetensors"):
        create_model("fastvit_t8", 8, pretrained="hub")


def test_local_weights_file_with_a_1000_class_head(tmp_path):
    donor = timm.create_model("fastvit_t8", num_classes=1000)
    path = tmp_path / "fastvit_t8.pth"
    torch.save(donor.state_dict(), path)
    model = create_model("fastvit_t8", 8, pretrained=str(path))
    assert model.head.fc.out_features == 8
    body = "stages.2.blocks.0.mlp.fc1.weight"
    assert torch.equal(model.state_dict()[body], donor.state_dict()[body])
    with pytest.raises(WeightsError, match="not found"):
        create_model("fastvit_t8", 8, pretrained=str(tmp_path / "missing.pth"))


def test_persistent_non_finite_loss_stops_with_a_message():
    module = KvasirClassifier(num_classes=8, max_nonfinite=3)
    module._trainer = SimpleNamespace(world_size=1, current_epoch=0, global_step=0)
    x = torch.full((2, 3, 32, 32), float("nan"))
    y = torch.zeros(2, dtype=torch.long)
    assert module.training_step((x, y), 0) is None  # skipped, not applied
    assert module.training_step((x, y), 1) is None
    with pytest.raises(RuntimeError, match="non-finite for 3 steps"):
        module.training_step((x, y), 2)


@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_test_metrics(fitted, shards, tmp_path):
    ckpt = str(fitted / "checkpoints" / "last.ckpt")
    common = ["test", "--config", SMOKE, "--data.shards", str(shards), "--ckpt_path", ckpt, *FAST]
    single, double = tmp_path / "one", tmp_path / "two"
    single.mkdir()
    double.mkdir()
    train(common, single)
    train([*common, "--trainer.devices", "2", "--trainer.strategy", "ddp"], double)
    a = json.loads(next(single.glob("runs/*/*/results.json")).read_text())
    b = json.loads(next(double.glob("runs/*/*/results.json")).read_text())
    assert a["num_samples"] == b["num_samples"] == 24
    for k in ("accuracy", "top3", "top5", "f1_macro", "mcc"):
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    pa = list(csv.reader(open(next(single.glob("runs/*/*/predictions.csv")))))
    pb = list(csv.reader(open(next(double.glob("runs/*/*/predictions.csv")))))
    assert [r[:3] for r in pa] == [r[:3] for r in pb]  # same samples, labels, predictions


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_fp16_fit_with_dali_on_the_gpu(shards, tmp_path):
    train(["fit", "--config", SMOKE, "--data.shards", str(shards), "--trainer.max_epochs", "1",
           "--trainer.accelerator", "gpu", "--trainer.precision", "16-mixed",
           "--data.device", "gpu", *FAST], tmp_path)
    results = json.loads(next(tmp_path.glob("runs/*/*/results.json")).read_text())
    assert results["num_samples"] == 24


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_resolves(config, shards, tmp_path):
    res = train(["fit", "--config", str(config), "--data.shards", str(shards), "--print_config"],
                tmp_path)
    assert "model_name: fastvit" in res.stdout and "batch_size:" in res.stdout
