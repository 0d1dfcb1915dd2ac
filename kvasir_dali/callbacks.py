"""Training throughput: images/sec and the share of step time spent waiting for data.

The device is synchronized only every `every` steps and at the epoch's end, never per step: a
per-step synchronize would stall the CPU's queueing of kernels and slow the training it
measures. Between synchronizations the clock counts host time, which is what matters for the
data wait: the time from the end of one step to the start of the next, when the loader is
asked for a batch and the device may run out of queued work.
"""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    """Logs `train/images_per_sec` and `train/data_wait` (fraction of wall time) every `every`
    steps and `train/epoch_images_per_sec` per epoch (all ranks' images)."""

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.epoch_rate: float | None = None
        self.epoch_wait: float | None = None
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.images = self.window_images = 0
        self.wait = self.window_wait = 0.0
        self.start = self.window_start = self.last_end = now

    @staticmethod
    def _sync(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset(self._sync(pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.wait += now - self.last_end
        self.window_wait += now - self.last_end
        self.images += len(batch[1])
        self.window_images += len(batch[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_end = time.perf_counter()
        if (batch_idx + 1) % self.every:
            return
        now = self.last_end = self._sync(pl_module)
        span = max(now - self.window_start, 1e-9)
        pl_module.log("train/images_per_sec", self.window_images * trainer.world_size / span,
                      prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log("train/data_wait", self.window_wait / span, on_step=True, on_epoch=False,
                      rank_zero_only=True)
        self.window_images, self.window_wait, self.window_start = 0, 0.0, now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        total = max(self._sync(pl_module) - self.start, 1e-9)
        if self.images:
            self.epoch_rate = self.images * trainer.world_size / total
            self.epoch_wait = self.wait / total
            pl_module.log("train/epoch_images_per_sec", self.epoch_rate, rank_zero_only=True)
            pl_module.log("train/epoch_data_wait", self.epoch_wait, rank_zero_only=True)
