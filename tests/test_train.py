"""kvasir-train: the real CLI and configs on generated shards, metrics, resume, weights, DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

from kvasir_dali.model import WeightsError, create_model
from kvasir_dali.module import KvasirClassifier
from kvasir_dali.report import read_metrics
from tests.helpers import BIN, FAST, ROOT, SMOKE, train


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
    table = "| Model | Accuracy | loss | F1-Score | Top-3 | Top-5 |"
    assert table in (fitted / "results.md").read_text()
    cols = next(csv.reader(open(fitted / "metrics.csv")))
    assert {"train/epoch_images_per_sec", "train/epoch_data_wait", "val/f1_macro"} <= set(cols)


def test_checkpoint_loads_weights_only(fitted):
    ckpt = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["class_names"][0] == "dyed-lifted-polyps"
    assert any(k.startswith("model.") for k in ckpt["state_dict"])


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


def _same_test_results(a_dir: Path, b_dir: Path) -> None:
    a = json.loads(next(a_dir.glob("runs/*/*/results.json")).read_text())
    b = json.loads(next(b_dir.glob("runs/*/*/results.json")).read_text())
    assert a["num_samples"] == b["num_samples"] == 24
    for k in ("accuracy", "top3", "top5", "f1_macro", "mcc"):
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    pa = list(csv.reader(open(next(a_dir.glob("runs/*/*/predictions.csv")))))
    pb = list(csv.reader(open(next(b_dir.glob("runs/*/*/predictions.csv")))))
    assert [r[:3] for r in pa] == [r[:3] for r in pb]  # same samples, labels, predictions


@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_test_metrics(fitted, shards, tmp_path):
    ckpt = str(fitted / "checkpoints" / "last.ckpt")
    common = ["test", "--config", SMOKE, "--data.shards", str(shards), "--ckpt_path", ckpt, *FAST]
    single, double = tmp_path / "one", tmp_path / "two"
    single.mkdir()
    double.mkdir()
    train(common, single)
    train([*common, "--trainer.devices", "2", "--trainer.strategy", "ddp"], double)
    _same_test_results(single, double)


@pytest.mark.slow
def test_torchrun_ddp_fit_gives_ranks_disjoint_samples_and_single_process_metrics(shards,
                                                                                  tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    record = {"class_path": "tests.helpers.RecordKeys", "init_args": {"out": str(ddp / "keys")}}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
           str(BIN / "kvasir-train"), "fit", "--config", SMOKE, "--data.shards", str(shards),
           "--trainer.max_epochs", "2",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", *FAST,
           f"--trainer.callbacks+={json.dumps(record)}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ddp, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    r0 = json.loads((ddp / "keys" / "rank0.json").read_text())
    r1 = json.loads((ddp / "keys" / "rank1.json").read_text())
    train_keys = {int(r["key"]) for r in csv.DictReader(open(shards / "samples.csv"))
                  if r["split"] == "train"}
    assert len(r0) == len(r1) == 2  # 48 training samples / 2 ranks / batch 16, drop last: 1 step
    for e0, e1 in zip(r0, r1):  # per epoch: full batches of training samples, no overlap
        assert len(e0) == len(e1) == 16 and set(e0) | set(e1) <= train_keys
        assert not set(e0) & set(e1)
    best = next((ddp / "runs" / "cpu_smoke" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    train(["test", "--config", SMOKE, "--data.shards", str(shards), "--ckpt_path", str(best),
           *FAST], single)
    _same_test_results(single, ddp)


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


def test_killed_mid_epoch_and_resumed_trains_exactly_like_an_uninterrupted_run(shards, tmp_path):
    common = ["fit", "--config", SMOKE, "--data.shards", str(shards), "--trainer.max_epochs",
              "3", *FAST]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir()
    crashed.mkdir()
    train(common, straight)
    kill = {"class_path": "tests.helpers.KillAt", "init_args": {"epoch": 1, "batch": 1}}
    res = train([*common, f"--trainer.callbacks+={json.dumps(kill)}"], crashed, check=False)
    assert res.returncode == -9  # SIGKILL in the middle of the second epoch
    run = crashed / "runs" / "cpu_smoke" / "version_0"
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert first["epoch"] == 0 and not (run / "results.json").exists()
    train([*common, "--ckpt_path", "last"], crashed)
    assert not (crashed / "runs" / "cpu_smoke" / "version_1").exists()  # same run folder
    a = torch.load(straight / "runs" / "cpu_smoke" / "version_0" / "checkpoints" / "last.ckpt",
                   weights_only=True, map_location="cpu")
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 9
    # Same optimizer state, schedule position and data order (DALI checkpoint) after the
    # resume: the weights match the uninterrupted run's. A resume that replayed epoch 0's data
    # order, or restarted the schedule, would not.
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-5), k
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    epochs = sorted(int(r["epoch"]) for r in read_metrics(run) if r.get("val/accuracy"))
    assert epochs == [0, 1, 2] and (run / "results.json").is_file()


def test_top3_is_not_merged_with_accuracy_when_the_first_batch_is_all_right():
    from kvasir_dali.module import eval_metrics

    metrics = eval_metrics(8)
    y = torch.tensor([0, 1, 2, 3])
    right = torch.nn.functional.one_hot(y, 8).float()  # batch 1: every sample right at top 1
    metrics.update(right, y)
    second = right.clone()
    second[:, 0] += 2.0  # batch 2: class 0 on top, the true class second: top-3 still right
    metrics.update(second.softmax(-1), y)
    out = {k: v.item() for k, v in metrics.compute().items()}
    assert out["accuracy"] == pytest.approx(5 / 8) and out["top3"] == pytest.approx(1.0)
