"""kvasir-predict and kvasir-export on a checkpoint of the short test fit."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from kvasir_dali.export import ParityError, check_parity
from kvasir_dali.inference import load_checkpoint
from tests.helpers import run_tool


@pytest.fixture(scope="module")
def best(fitted) -> Path:
    return next((fitted / "checkpoints").glob("best-*.ckpt"))


def samples(shards: Path, split: str) -> list[dict]:
    return [r for r in csv.DictReader(open(shards / "samples.csv")) if r["split"] == split]


def test_reparameterized_model_predicts_what_the_unfused_one_does(best):
    fused, pre = load_checkpoint(best)
    plain, _ = load_checkpoint(best, fuse=False)
    # Fusion really happened: the train-time branches are gone.
    assert sum(1 for _ in fused.modules()) < sum(1 for _ in plain.modules())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, pre.image_size, pre.image_size, generator=gen)
    with torch.no_grad():
        a, b = plain(x), fused(x)
    assert torch.allclose(a, b, atol=1e-4 * max(1.0, a.abs().max().item()))
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert pre.image_size == 48 and pre.classes[0] == "dyed-lifted-polyps"


def test_predict_on_the_test_sources_reproduces_kvasir_train_test(best, fitted, shards, tmp_path):
    # kvasir-train test wrote predictions.csv for the best checkpoint (keys, probabilities).
    trained = {r["key"]: r for r in csv.DictReader(open(fitted / "predictions.csv"))}
    test = samples(shards, "test")
    src = Path(json.loads((shards / "manifest.json").read_text())["source"])
    files = [str(src / r["source"]) for r in test]
    out = tmp_path / "pred.csv"
    res = run_tool("kvasir-predict", [str(best), *files, "--out", str(out), "--batch-size", "5"])
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == files and len(rows) == 24
    classes = json.loads((shards / "manifest.json").read_text())["classes"]
    for sample, row in zip(test, rows):
        ref = trained[sample["key"]]
        assert row["pred"] == ref["pred"] and row["error"] == ""
        assert row["pred_class"] == classes[int(ref["pred"])]
        for c in classes:
            assert float(row[f"p_{c}"]) == pytest.approx(float(ref[f"p_{c}"]), abs=1e-4)
        assert row["top3"].split(";")[0] == row["pred_class"]
    assert "24 of 24 images predicted" in res.stdout and "images/s" in res.stdout
    # The shards folder as input: the same test split, the same numbers.
    out2 = tmp_path / "pred_shards.csv"
    run_tool("kvasir-predict", [str(best), str(shards), "--out", str(out2)])
    by_path = {r["path"]: r for r in csv.DictReader(open(out2))}
    assert sorted(by_path) == sorted(files)
    assert all(by_path[r["path"]]["pred"] == r["pred"] for r in rows)


def test_a_corrupt_file_gets_its_error_and_the_rest_are_predicted(best, synth_dir, tmp_path):
    folder = tmp_path / "in" / "nested"
    folder.mkdir(parents=True)
    good = sorted(synth_dir.glob("polyps/*.jpg"))[:3]
    for f in good:
        shutil.copy(f, folder / f.name)
    data = good[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.jpg").write_bytes(b"not an image at all")
    buf = io.BytesIO()  # needs converting, as the shard builder would: PNG with alpha
    Image.open(good[1]).convert("RGBA").save(buf, "PNG")
    (folder / "frame.png").write_bytes(buf.getvalue())
    out = tmp_path / "pred.csv"
    res = run_tool("kvasir-predict", [str(best), str(tmp_path / "in"), "--out", str(out)],
                   check=False)
    assert res.returncode == 1  # some inputs failed; their rows say why
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out))}
    assert len(rows) == 6
    assert "does not decode" in rows["truncated.jpg"]["error"]
    assert rows["truncated.jpg"]["pred"] == ""
    assert "does not decode" in rows["notes.jpg"]["error"]
    for name in [f.name for f in good] + ["frame.png"]:
        assert rows[name]["error"] == "" and rows[name]["pred_class"], name
    # The PNG is the same picture as good[1]: same class, close probabilities.
    assert rows["frame.png"]["pred"] == rows[good[1].name]["pred"]
    assert "4 of 6 images predicted (2 with errors)" in res.stdout


def test_onnx_export_matches_pytorch_in_onnxruntime_with_metadata(best, shards, tmp_path):
    out = tmp_path / "model.onnx"
    res = run_tool("kvasir-export", [str(best), "--format", "onnx", "--out", str(out),
                                     "--inputs", str(shards)])
    assert "parity on 8 images" in res.stderr
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    info = json.loads(meta["kvasir"])
    assert info["classes"][0] == "dyed-lifted-polyps" and info["image_size"] == 48
    assert len(info["mean"]) == len(info["std"]) == 3
    model, pre = load_checkpoint(best)
    x = torch.randn(5, 3, 48, 48, generator=torch.Generator().manual_seed(1))  # batch 5: dynamic
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == (5, 8)
    check_parity(ref, got)


def test_torchscript_runs_in_a_process_that_imports_only_torch(best, shards, tmp_path):
    out = tmp_path / "model.pt"
    run_tool("kvasir-export", [str(best), "--format", "torchscript", "--out", str(out),
                               "--inputs", str(shards)])
    code = (
        "import json, sys, torch\n"
        "extra = {'kvasir.json': ''}\n"
        f"m = torch.jit.load({str(out)!r}, _extra_files=extra)\n"
        "info = json.loads(extra['kvasir.json'])\n"
        "y = m(torch.zeros(3, 3, info['image_size'], info['image_size']))\n"
        "bad = ('timm', 'kvasir_dali', 'lightning')\n"
        "assert not any(k.split('.')[0] in bad for k in sys.modules)\n"
        "print(tuple(y.shape), len(info['classes']))\n")
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(3, 8) 8"


def test_safetensors_export_writes_weights_and_a_json_beside(best, shards, tmp_path):
    out = tmp_path / "model.safetensors"
    run_tool("kvasir-export", [str(best), "--format", "safetensors", "--out", str(out),
                               "--inputs", str(shards)])
    info = json.loads((tmp_path / "model.safetensors.json").read_text())
    assert info["model_name"] == "fastvit_t8" and len(info["classes"]) == 8


def test_parity_check_rejects_different_logits():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]], np.float32)
    assert check_parity(ref, ref + 1e-5) < 1e-4
    with pytest.raises(ParityError, match="max \\|diff\\|"):
        check_parity(ref, ref + 0.05)
    with pytest.raises(ParityError):
        check_parity(ref, ref[:, ::-1].copy())  # classes swapped


def test_predict_names_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"garbage")
    res = run_tool("kvasir-predict", [str(bad), str(tmp_path)], check=False)
    assert res.returncode == 2 and f"{bad}: not a readable kvasir-train checkpoint" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_predict_on_the_gpu_in_fp16_agrees_with_the_cpu(best, shards, tmp_path):
    rows = {}
    for device, precision in (("cpu", "32"), ("gpu", "16")):
        out = tmp_path / f"{device}.csv"
        run_tool("kvasir-predict", [str(best), str(shards), "--out", str(out), "--device",
                                    device, "--precision", precision])
        rows[device] = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows["cpu"]] == [r["path"] for r in rows["gpu"]]
    classes = [k for k in rows["cpu"][0] if k.startswith("p_")]
    for a, b in zip(rows["cpu"], rows["gpu"]):  # hardware decoder + fp16: close, not equal
        assert max(abs(float(a[c]) - float(b[c])) for c in classes) < 0.05


def test_cam_writes_one_png_per_predicted_image_and_a_grid(best, synth_dir, tmp_path):
    folder = tmp_path / "in"
    (folder / "again").mkdir(parents=True)
    good = sorted(synth_dir.glob("polyps/*.jpg"))[:3]
    for f in good:
        shutil.copy(f, folder / f.name)
    shutil.copy(good[0], folder / "again" / good[0].name)  # the same file name twice
    (folder / "broken.jpg").write_bytes(b"no image")
    res = run_tool("kvasir-predict", [str(best), str(folder), "--out", str(tmp_path / "p.csv"),
                                      "--cam", str(tmp_path / "cams")], check=False)
    assert res.returncode == 1 and "4 class-activation maps" in res.stderr
    pngs = sorted(p.name for p in (tmp_path / "cams").glob("*.png"))
    assert len(pngs) == 5 and "cams.png" in pngs  # 4 predicted images + the grid
    assert len({Image.open(tmp_path / "cams" / p).size for p in pngs if p != "cams.png"}) == 1
