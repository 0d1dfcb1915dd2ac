"""kvasir-train, -predict and -shard verify on damaged shards, hostile checkpoints and bad
options: one to three lines naming the file, exit 2, no traceback, nothing run from a pickle,
no empty run folder left behind."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from shard_tools.manifest import FORMAT_VERSION
from shard_tools.tario import parse_index
from tests.helpers import FAST, SMOKE, run_tool, train


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _user_error(res: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2; the message (from `<tool>: error:` on, after any of Lightning's start-up
    lines) is one to three lines holding `words`; no traceback."""
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.replace("\r", "\n")
    assert "Traceback" not in err, err[-3000:]
    start = err.find(": error: ")
    message = err[err.rfind("\n", 0, start) + 1:].strip().splitlines() if start >= 0 else []
    assert 1 <= len(message) <= 3, err[-3000:]
    for w in words:
        assert w in "\n".join(message), (w, message)


def _fit(shards: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return train(["fit", "--config", SMOKE, "--data.shards", str(shards), "--trainer.max_epochs",
                  "1", *FAST, *extra], cwd, check=False)


def _copy(shards: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(shards, tmp / "shards"))


def _no_run_folder(cwd: Path) -> None:
    assert not list(cwd.glob("runs/*/version_*")), list(cwd.glob("runs/**/*"))


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_flipped_byte_in_a_shard_the_fit_reads_stops_it_before_the_trainer_starts(
        split, shards, tmp_path):
    """The test split too: a fit tests its best checkpoint at the end, hours later."""
    copy = _copy(shards, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    tar = copy / manifest["splits"][split]["shards"][-1]["tar"]
    data = bytearray(tar.read_bytes())
    data[4000] ^= 0x01
    tar.write_bytes(bytes(data))
    res = _fit(copy, tmp_path)
    _user_error(res, str(tar), "SHA-256 differs", f"kvasir-shard verify {copy}")
    assert "GPU available" not in res.stderr  # nothing started: the error is the only news
    _no_run_folder(tmp_path)


def test_an_edited_manifest_count_stops_the_run(shards, tmp_path):
    copy = _copy(shards, tmp_path)
    m = json.loads((copy / "manifest.json").read_text())
    m["splits"]["val"]["count"] += 1
    (copy / "manifest.json").write_text(json.dumps(m))
    _user_error(_fit(copy, tmp_path), "manifest.json", "val split counts")


def _undecodable_sample(copy: Path) -> tuple[Path, str]:
    """Break one training JPEG's header and make the manifest agree (as if a foreign tool
    packed it): only decoding can find it."""
    m = json.loads((copy / "manifest.json").read_text())
    entry = m["splits"]["train"]["shards"][0]
    tar, idx = copy / entry["tar"], copy / entry["idx"]
    row = parse_index(idx.read_text())[2]
    jpg = next(member for member in row if member.ext == "jpg")
    data = bytearray(tar.read_bytes())
    data[jpg.offset : jpg.offset + 200] = bytes(200)
    tar.write_bytes(bytes(data))
    entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(m))
    return tar, jpg.name.split(".")[0]


def test_an_undecodable_sample_names_its_shard_and_key(shards, tmp_path):
    copy = _copy(shards, tmp_path)
    tar, key = _undecodable_sample(copy)
    res = _fit(copy, tmp_path)
    _user_error(res, f"{tar}: sample {key} does not decode")
    _no_run_folder(tmp_path)


def test_a_manifest_of_another_format_version_is_refused_by_every_reader(shards, tmp_path):
    copy = _copy(shards, tmp_path)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION - 1
    (copy / "manifest.json").write_text(json.dumps(m))
    words = (f"format version {FORMAT_VERSION - 1}", f"reads version {FORMAT_VERSION}", "rebuild")
    _user_error(run_tool("kvasir-shard", ["verify", str(copy)], check=False), *words)
    _user_error(_fit(copy, tmp_path), *words)
    (copy / "manifest.json").write_text("{not json")
    _user_error(run_tool("kvasir-shard", ["verify", str(copy)], check=False), "manifest.json")


def test_bad_paths_and_options_are_one_line_errors(shards, tmp_path):
    _user_error(_fit(tmp_path / "nowhere", tmp_path), "nowhere", "kvasir-shard build")
    res = _fit(shards, tmp_path, "--data.batch_size", "1000")
    _user_error(res, "larger than a rank's share")
    assert "GPU available" not in res.stderr  # refused before the Trainer started
    _user_error(_fit(shards, tmp_path, "--data.fold", "1"), "--data.fold", "not folds")
    _no_run_folder(tmp_path)
    src = json.loads((shards / "manifest.json").read_text())["source"]
    for option, value in (("--shard-mb", "0"), ("--name", "a/b"), ("--folds", "1")):
        res = run_tool("kvasir-shard", ["build", src, str(tmp_path / "o"), option, value],
                       check=False)
        _user_error(res, option)
        assert not (tmp_path / "o").exists()


@pytest.fixture
def payload(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": Payload(marker), "hyper_parameters": {"model_name": "x"}}, path)
    return path, marker


def test_no_checkpoint_load_runs_pickled_code(payload, shards, tmp_path):
    path, marker = payload
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    try:
        for sub in ("test", "fit"):
            res = train([sub, "--config", SMOKE, "--data.shards", str(shards), "--ckpt_path", url,
                         *FAST], tmp_path, check=False)
            _user_error(res, "local files only")
        res = train(["test", "--config", SMOKE, "--data.shards", str(shards), "--ckpt_path",
                     str(path), *FAST], tmp_path, check=False)
        _user_error(res, str(path), "pickled code are refused")
        _user_error(_fit(shards, tmp_path, "--model.pretrained", str(path)), str(path),
                    "never runs code")
        res = run_tool("kvasir-predict", [str(path), str(tmp_path)], check=False)
        _user_error(res, str(path))
    finally:
        server.shutdown()
    assert not marker.exists()
    _no_run_folder(tmp_path)


def test_a_foreign_or_truncated_checkpoint_is_named(fitted, shards, tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((fitted / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    for ckpt, why in ((foreign, "not a kvasir-train checkpoint"),
                      (truncated, "not a readable kvasir-train checkpoint")):
        res = train(["test", "--config", SMOKE, "--data.shards", str(shards), "--ckpt_path",
                     str(ckpt), *FAST], tmp_path, check=False)
        _user_error(res, str(ckpt), why)
    _no_run_folder(tmp_path)


def test_resuming_a_moved_run_folder_trains_and_tests_in_its_new_place(shards, tmp_path):
    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    assert _fit(shards, first).returncode == 0
    first.rename(moved)
    res = train(["fit", "--config", SMOKE, "--data.shards", str(shards), "--trainer.max_epochs",
                 "2", "--ckpt_path", "last", *FAST], moved, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    run = moved / "runs" / "cpu_smoke" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert results["num_samples"] == 24
    assert not (moved / "runs" / "cpu_smoke" / "version_1").exists()  # resumed in place


@pytest.mark.parametrize("name,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_or_sigterm_mid_fit_ends_in_one_line_and_keeps_the_run(name, status, shards,
                                                                       tmp_path):
    stop = {"class_path": "tests.helpers.SignalAt",
            "init_args": {"epoch": 1, "batch": 0, "name": name}}
    res = train(["fit", "--config", SMOKE, "--data.shards", str(shards), "--trainer.max_epochs",
                 "3", *FAST, f"--trainer.callbacks+={json.dumps(stop)}"], tmp_path, check=False)
    assert res.returncode == status, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"kvasir-train: stopped by {name}" in res.stderr.splitlines()[-1]
    run = tmp_path / "runs" / "cpu_smoke" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert f"{last.relative_to(tmp_path)} holds the last finished epoch" in res.stderr
    epoch = torch.load(last, weights_only=True, map_location="cpu")["epoch"]
    assert epoch == 0 and not (run / "results.json").exists()  # stopped in the second epoch
