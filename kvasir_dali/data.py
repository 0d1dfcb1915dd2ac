"""`KvasirDataModule`: DALI pipelines over the shards, built per rank in `setup()`.

Loaders yield `(images, labels)`: images (N, 3, S, S) float16 under 16-bit precision, else
float32 (channels-last memory format when asked), on the training device; labels (N,) int64.
Validation and test loaders add a third element, the sample keys (N,) int64 (the numbers of
`samples.csv`'s `key` column), so that predictions can be written per sample.
Training drops the last partial batch; validation and test deliver every sample of the split
exactly once across ranks (DALI pads each rank's share for equal step counts and the iterator
drops the padding).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import lightning as L
import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .pipeline import Augment, PipeSpec, build_pipeline
from .shards import ShardSet

log = logging.getLogger(__name__)


def model_norm(model_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of [0, 1] pixels from the model's timm pretrained config."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        raise ValueError(f"timm knows no pretrained config for '{model_name}'")
    return tuple(cfg.mean), tuple(cfg.std)


class DaliLoader:
    """A DALI iterator as a re-iterable of `(images, labels)` with an exact `len()`."""

    def __init__(self, spec: PipeSpec) -> None:
        self.spec = spec
        self.pipe = build_pipeline(spec)
        self.last_keys: torch.Tensor | None = None  # (N,) sample keys of the latest batch
        policy = LastBatchPolicy.DROP if spec.train else LastBatchPolicy.PARTIAL
        self._it = DALIGenericIterator(self.pipe, ["images", "labels"], reader_name="Reader",
                                       last_batch_policy=policy, auto_reset=True)

    def __len__(self) -> int:
        return len(self._it)

    def state(self) -> str:
        """DALI checkpoint of the training pipeline: where the next epoch starts."""
        return self._it.checkpoints()[0]

    def __iter__(self):
        for batch in self._it:
            images, lbl = batch[0]["images"], batch[0]["labels"]  # lbl: (N, 2) label, key
            self.last_keys = lbl[:, 1]
            if self.spec.channels_last:  # (N, S, S, 3) -> (N, 3, S, S) view, NHWC in memory
                images = images.permute(0, 3, 1, 2)
            if self.spec.train:
                yield images, lbl[:, 0]
            else:
                yield images, lbl[:, 0], lbl[:, 1]


class KvasirDataModule(L.LightningDataModule):
    """Kvasir shards through DALI.

    Args:
        shards: folder written by `kvasir-shard build`.
        batch_size: per device.
        image_size: side of the square model input, pixels.
        device: "auto" (the trainer's device), "gpu" or "cpu".
        num_threads: DALI CPU threads per rank (default: the cores divided among local ranks).
        seed: base seed; rank r uses seed + r.
        model_name: timm model whose pretrained config gives the normalization constants.
        channels_last: deliver NHWC memory layout.
        augment: training augmentation.
        shuffle_buffer: samples DALI holds for shuffling (default: a rank's whole share).
        hw_decoder_load: share of JPEGs for the GPU's hardware decoder.
    """

    def __init__(self, shards: str, batch_size: int = 64, image_size: int = 384,
                 device: str = "auto", num_threads: int | None = None, seed: int = 0,
                 model_name: str = "fastvit_t8", channels_last: bool = False,
                 augment: Augment | None = None, shuffle_buffer: int | None = None,
                 hw_decoder_load: float = 0.65) -> None:
        super().__init__()
        if device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', not {device!r}")
        self.shard_set = ShardSet.open(shards)  # reads JSON only: no CUDA before the trainer
        self.batch_size, self.image_size = batch_size, image_size
        self.device, self.num_threads, self.seed = device, num_threads, seed
        self.model_name, self.channels_last = model_name, channels_last
        self.augment = augment or Augment()
        self.shuffle_buffer, self.hw_decoder_load = shuffle_buffer, hw_decoder_load
        self.loaders: dict[str, DaliLoader] = {}
        self.picked: str | None = None
        self._resume: str | None = None  # this rank's DALI checkpoint, from load_state_dict

    @property
    def classes(self) -> list[str]:
        return self.shard_set.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # -- rank-dependent set-up --------------------------------------------------------------
    def _placement(self) -> tuple[int, int, int, str, int | None, bool]:
        """(global rank, world size, local world size, device, device_id, fp16)."""
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t else (0, 1)
        local_world = max(1, t.num_devices) if t else 1
        on_cuda = bool(t) and t.strategy.root_device.type == "cuda"
        device = self.device
        if device == "auto":
            device = "gpu" if on_cuda else "cpu"
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("data.device='gpu' but no CUDA GPU is visible; use device='cpu' "
                               "(or 'auto') to run the same pipeline on the CPU")
        if device == "gpu" and not on_cuda:
            raise RuntimeError("data.device='gpu' needs the trainer on the GPU "
                               "(--trainer.accelerator gpu)")
        device_id = t.strategy.root_device.index if device == "gpu" else None
        fp16 = bool(t) and str(t.precision) in ("16-mixed", "16-true", "16")
        return rank, world, local_world, device, device_id, fp16

    def setup(self, stage: str | None = None) -> None:
        rank, world, local_world, device, device_id, fp16 = self._placement()
        if self.picked is None:
            log.info("DALI on %s (rank %d of %d)", device if device == "cpu" else
                     f"gpu:{device_id}", rank, world)
        self.picked = device
        threads = self.num_threads or max(1, (os.cpu_count() or 1) // local_world)
        mean, std = model_norm(self.model_name)
        base = PipeSpec(tars=[], indexes=[], batch_size=self.batch_size,
                        image_size=self.image_size, mean=mean, std=std, train=False,
                        device=device, device_id=device_id, num_threads=threads, shard_id=rank,
                        num_shards=world, seed=self.seed + rank, fp16=fp16,
                        channels_last=self.channels_last, hw_decoder_load=self.hw_decoder_load,
                        augment=self.augment)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                  "predict": ("test",)}.get(stage or "fit", ("train", "val", "test"))
        for split in wanted:
            if split in self.loaders:
                continue
            files = self.shard_set.files(split)
            share = files.count // world
            if split == "train" and share < self.batch_size:
                raise ValueError(f"batch size {self.batch_size} is larger than a rank's share of "
                                 f"the training split ({share} of {files.count} samples over "
                                 f"{world} ranks); lower --data.batch_size")
            spec = replace(base, tars=files.tars, indexes=files.indexes, train=split == "train",
                           shuffle_buffer=self.shuffle_buffer or max(1, -(-files.count // world)))
            if split == "train":
                spec = replace(spec, checkpoint=self._resume)
            self.loaders[split] = DaliLoader(spec)

    # -- data position in checkpoints ------------------------------------------------------
    def state_dict(self) -> dict:
        """Every rank's training-pipeline position (called on all ranks; rank 0 writes it)."""
        loader = self.loaders.get("train")
        if loader is None:
            return {}
        states = [loader.state()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, loader.state())
        return {"dali_train": states}

    def load_state_dict(self, state: dict) -> None:
        """Resume the training pipeline where the checkpoint's epoch ended (Lightning calls
        this after setup(), so the already built training pipeline is rebuilt)."""
        states = state.get("dali_train") or []
        rank, world = self._placement()[:2]
        if len(states) != world:
            log.warning("checkpoint holds the data position of %d ranks, this run has %d: the "
                        "training data order restarts from the seed", len(states), world)
            return
        self._resume = states[rank]
        if "train" in self.loaders:
            self.loaders["train"] = DaliLoader(replace(self.loaders["train"].spec,
                                                       checkpoint=self._resume))

    def teardown(self, stage: str | None = None) -> None:
        self.loaders.clear()

    def train_dataloader(self) -> DaliLoader:
        return self.loaders["train"]

    def val_dataloader(self) -> DaliLoader:
        return self.loaders["val"]

    def test_dataloader(self) -> DaliLoader:
        return self.loaders["test"]
