"""Training throughput: images/sec and the share of step time spent waiting for data."""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    """Logs `train/images_per_sec` and `train/data_wait` (fraction of wall time).

    The wait is the time between the end of one step and the start of the next, which is
    when the loader is asked for a batch. Under CUDA, the step end is synchronized so that
    asynchronous kernels are not counted as waiting.
    """

    def __init__(self) -> None:
        self.images = 0
        self.wait = 0.0
        self.start = None
        self.last_end = None
        self.epoch_rate: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.images, self.wait = 0, 0.0
        self.start = self.last_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.wait += now - self.last_end
        self.images += len(batch[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.last_end = time.perf_counter()
        total = self.last_end - self.start
        world = trainer.world_size
        pl_module.log("train/images_per_sec", self.images * world / total, prog_bar=True,
                      on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log("train/data_wait", self.wait / total, on_step=True, on_epoch=False,
                      rank_zero_only=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        total = time.perf_counter() - self.start
        if self.images:
            self.epoch_rate = self.images * trainer.world_size / total
            pl_module.log("train/epoch_images_per_sec", self.epoch_rate, rank_zero_only=True)
