"""kvasir-shard build's OUT: never the source, never someone else's files, one build at a time,
no leftovers, and Ctrl-C or SIGTERM end it cleanly."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from shard_tools import outdir
from shard_tools.build import BuildSpec, build
from shard_tools.outdir import OutError
from tests.helpers import BIN, run_tool


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


def _shard(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_tool("kvasir-shard", ["build", *args, "--workers", "1"], cwd=cwd, check=False,
                    timeout=300)


def _refused(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 3
    for w in words:
        assert w in res.stderr, (w, res.stderr)


def test_out_equal_to_or_holding_the_source_is_refused_and_nothing_is_deleted(synth_dir,
                                                                               tmp_path):
    data = tmp_path / "data"
    src = data / "kvasir"
    src.mkdir(parents=True)
    for p in sorted(synth_dir.rglob("*.jpg"))[:16]:
        (src / p.parent.name).mkdir(exist_ok=True)
        (src / p.parent.name / p.name).write_bytes(p.read_bytes())
    (data / "notes.txt").write_text("mine")
    before = _files(data)
    _refused(_shard([str(src), str(src), "--overwrite"]), "is the source")
    _refused(_shard([str(src), str(data), "--overwrite"]), "holds it")
    _refused(_shard([str(src), str(src / "polyps" / "out")]), "inside it")
    assert _files(data) == before


def test_overwrite_replaces_only_an_earlier_build(synth_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    _refused(_shard([str(synth_dir), str(out), "--overwrite"]), "not an earlier kvasir-shard")
    (out / "thesis.tex").unlink()
    assert _shard([str(synth_dir), str(out)]).returncode == 0  # an empty folder is fine
    first = _files(out)
    assert _shard([str(synth_dir), str(out), "--overwrite", "--seed", "1"]).returncode == 0
    assert _files(out) != first and (out / "manifest.json").is_file()
    (out / "train" / "notes.txt").write_text("added by hand")
    _refused(_shard([str(synth_dir), str(out), "--overwrite"]), "did not write", "notes.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, partial or old


def test_current_folder_and_mount_points_are_refused_before_any_work(synth_dir, tmp_path,
                                                                     monkeypatch):
    _refused(_shard([str(synth_dir), "."], cwd=tmp_path), "current folder")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    monkeypatch.setattr(outdir.os.path, "ismount", lambda p: Path(p) == mnt)
    with pytest.raises(OutError, match="mount point"):
        build(BuildSpec(src=str(synth_dir), out=str(mnt), workers=1))


def test_a_second_build_into_the_same_out_fails_at_once(synth_dir, tmp_path):
    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "a") as held:  # what a running build holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        start = time.monotonic()
        res = _shard([str(synth_dir), str(out)])
        _refused(res, "another kvasir-shard build is writing")
        assert time.monotonic() - start < 60 and not out.exists()


def test_leftovers_of_a_dead_build_are_removed_and_a_stranded_out_restored(synth_dir,
                                                                            tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.partial-99999" / "train").mkdir(parents=True)
    res = _shard([str(synth_dir), str(out)])
    assert res.returncode == 0 and ".out.partial-99999" in res.stderr
    built = _files(out)
    out.rename(tmp_path / ".out.old-4242")  # killed between the two renames of a replacement
    res = _shard([str(synth_dir), str(out), "--overwrite"])
    assert res.returncode == 0 and "restored" in res.stderr
    assert _files(out) == built and not (tmp_path / ".out.old-4242").exists()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_build_ends_with_one_line_and_keeps_the_earlier_build(synth_dir, tmp_path,
                                                                           sig, code):
    out = tmp_path / "out"
    assert _shard([str(synth_dir), str(out)]).returncode == 0
    earlier = _files(out)
    proc = subprocess.Popen([str(BIN / "kvasir-shard"), "build", str(synth_dir), str(out),
                             "--overwrite", "--workers", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, sig)  # as a terminal or a job scheduler does: the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after the cleared progress bar
    assert "Traceback" not in err and last == f"kvasir-shard: stopped by {sig.name}"
    assert _files(out) == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
