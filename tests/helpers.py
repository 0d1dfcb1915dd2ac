"""The installed command-line tools, run from tests as a user would, and the test-only
Lightning callbacks those runs load by class path (a crash mid-epoch, the keys each rank saw)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "cpu_smoke.yaml")
BIN = Path(sys.executable).parent
# Tiny images and batches: tests check behaviour, not accuracy.
FAST = ["--data.image_size", "48", "--data.batch_size", "16", "--trainer.enable_progress_bar",
        "false", "--trainer.log_every_n_steps", "1"]


def run_tool(tool: str, args: list[str], cwd: Path | None = None, check: bool = True,
             timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `tool` (kvasir-train, kvasir-predict...) from this environment's bin folder; a
    timeout (seconds) so that a hang fails the test instead of stalling the suite."""
    # PYTHONPATH: the tools can load test-only classes such as KillAt by their class path.
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **(env or {}))
    res = subprocess.run([str(BIN / tool), *args], cwd=cwd, capture_output=True, text=True,
                         env=env, timeout=timeout)
    if check and res.returncode:
        raise AssertionError(f"{tool} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def train(args: list[str], cwd: Path, check: bool = True,
          env: dict | None = None) -> subprocess.CompletedProcess:
    return run_tool("kvasir-train", args, cwd, check, env=env)


class KillAt(Callback):
    """SIGKILLs its own process after training batch `batch` of epoch `epoch`: a crash mid-epoch."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordKeys(Callback):
    """Writes the sample keys of every training batch this rank saw to `out`/rank<r>.json."""

    def __init__(self, out: str) -> None:
        self.out, self.keys = Path(out), []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.keys.append(trainer.datamodule.loaders["train"].last_keys.tolist())

    def on_fit_end(self, trainer, module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))


class SignalAt(Callback):
    """Sends its own process signal `name` (SIGINT, SIGTERM) after training batch `batch` of
    epoch `epoch`: a user's Ctrl-C, or a scheduler ending the job."""

    def __init__(self, epoch: int, batch: int, name: str) -> None:
        self.epoch, self.batch, self.signum = epoch, batch, signal.Signals[name]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)
