"""kvasir-predict never hangs and never drops an input; its exit status says what happened."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_tool


@pytest.fixture(scope="module")
def best(fitted) -> Path:
    return next((fitted / "checkpoints").glob("best-*.ckpt"))


def _rows(out: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in csv.DictReader(open(out))}


def test_special_files_and_broken_links_get_error_rows_without_hanging(best, synth_dir,
                                                                      tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted(synth_dir.glob("polyps/*.jpg"))[:2]
    for f in good:
        shutil.copy(f, folder / f.name)
    os.mkfifo(folder / "fifo.jpg")
    os.symlink(tmp_path / "gone.jpg", folder / "broken.jpg")
    (folder / "dir.jpg").mkdir()
    (folder / "dir.jpg" / "inner.jpg").write_bytes(good[0].read_bytes())
    os.mkfifo(tmp_path / "named.jpg")
    os.symlink(tmp_path / "gone2.jpg", tmp_path / "named-broken.jpg")
    out = tmp_path / "pred.csv"
    res = run_tool("kvasir-predict", [str(best), str(folder), str(tmp_path / "named.jpg"),
                                      str(tmp_path / "named-broken.jpg"), "--out", str(out)],
                   check=False, timeout=600)
    assert res.returncode == 1, res.stderr[-2000:]  # some predicted, some failed
    rows = _rows(out)
    assert set(rows) == {*(f.name for f in good), "fifo.jpg", "broken.jpg", "dir.jpg",
                         "inner.jpg", "named.jpg", "named-broken.jpg"}
    for name in ("fifo.jpg", "named.jpg"):
        assert rows[name]["error"] == "not a regular file (a FIFO, socket or device): not read"
    for name in ("broken.jpg", "named-broken.jpg"):
        assert rows[name]["error"].startswith("broken symbolic link")
    assert rows["dir.jpg"]["error"] == "a directory, not an image file"
    assert all(rows[n]["pred_class"] and not rows[n]["error"]
               for n in (good[0].name, good[1].name, "inner.jpg"))


def test_unwritable_out_fails_before_any_prediction(best, synth_dir, tmp_path):
    res = run_tool("kvasir-predict", [str(best), str(synth_dir / "polyps"), "--out",
                                      str(tmp_path / "missing_dir" / "x.csv")], check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot write --out" in res.stderr and "missing_dir" in res.stderr
    assert "predicting" not in res.stderr and "checking" not in res.stderr


def test_nothing_predicted_exits_2_with_every_row_written(best, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "b.png").write_bytes(b"")
    out = tmp_path / "pred.csv"
    res = run_tool("kvasir-predict", [str(best), str(tmp_path / "a.jpg"), str(tmp_path / "b.png"),
                                      str(tmp_path / "c.jpg"), "--out", str(out)], check=False)
    assert res.returncode == 2
    rows = _rows(out)
    assert "does not decode" in rows["a.jpg"]["error"] and rows["b.png"]["error"] == "empty file"
    assert rows["c.jpg"]["error"] == "does not exist"
    assert "0 of 3 images predicted" in res.stdout


def test_ctrl_c_mid_prediction_writes_what_was_predicted_and_names_the_rest(
        best, synth_dir, shards, tmp_path, monkeypatch, capsys):
    from kvasir_dali import predict
    from kvasir_dali.predictor import Predictor

    real, calls = Predictor.probs, []

    def probs_then_ctrl_c(self, images):  # the user presses Ctrl-C during the second batch
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(Predictor, "probs", probs_then_ctrl_c)
    images = sorted(synth_dir.glob("polyps/*.jpg"))[:8]
    out = tmp_path / "pred.csv"
    status = predict.main([str(best), *map(str, images), str(shards), "--batch-size", "4",
                           "--device", "cpu", "--out", str(out)])
    assert status == 130 and "stopped by SIGINT" in capsys.readouterr().err
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == [*map(str, images), str(shards)]  # every input, in order
    predicted = [r for r in rows if r["pred_class"]]
    assert len(predicted) == calls[0] == 4 and not any(r["error"] for r in predicted)
    assert all(r["error"] == "not predicted: stopped by SIGINT" for r in rows
               if not r["pred_class"])
