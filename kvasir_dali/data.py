"""`KvasirDataModule`: DALI pipelines over the shards, built per rank in `setup()`.

Loaders yield `(images, labels)`: images (N, 3, S, S) float16 under 16-bit precision, else
float32 (channels-last memory format when asked), on the training device; labels (N,) int64.
Validation and test loaders add a third element, the sample keys (N,) int64 (the numbers of
`samples.csv`'s `key` column), so that predictions can be written per sample.
Training drops the last partial batch; validation and test deliver every sample of the split
exactly once across ranks (DALI pads each rank's share for equal step counts and the iterator
drops the padding). Before any pipeline is built, every shard the stage reads is checked
against the manifest (`ShardSet.files`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import lightning as L
import torch

from shard_tools.errors import UserError

from .augment import Augment
from .loader import DaliLoader
from .model import preprocessing
from .pipeline import PipeSpec
from .shards import ShardSet

log = logging.getLogger(__name__)
STAGE_ROLES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
               "predict": ("test",)}


class DataError(UserError):
    """The data settings cannot work with these shards (e.g. a batch larger than a split)."""


class KvasirDataModule(L.LightningDataModule):
    """Kvasir shards through DALI.

    Args:
        shards: folder written by `kvasir-shard build`.
        batch_size: per device.
        image_size: side of the square model input, pixels.
        device: "auto" (the trainer's device), "gpu" or "cpu".
        num_threads: DALI CPU threads per rank (default: the cores divided among local ranks).
        seed: base seed (default: the run's `seed_everything`); rank r uses seed + r for
            augmentation and in-buffer shuffling; the per-epoch shard order uses the base seed.
        model_name: timm model whose pretrained config gives the normalization constants.
        channels_last: deliver NHWC memory layout.
        augment: training augmentation.
        shuffle_buffer: samples DALI holds for shuffling (bounded: memory does not grow with
            the data; the shards are shuffled when packed and their order every epoch).
        hw_decoder_load: share of JPEGs for the GPU's hardware decoder.
        fold: with shards built with `--folds K`: validate on this fold, train on the others.
    """

    def __init__(self, shards: str, batch_size: int = 64, image_size: int = 384,
                 device: str = "auto", num_threads: int | None = None, seed: int | None = None,
                 model_name: str = "fastvit_t8", channels_last: bool = False,
                 augment: Augment | None = None, shuffle_buffer: int = 2048,
                 hw_decoder_load: float = 0.65, fold: int | None = None) -> None:
        super().__init__()
        problems = [msg for bad, msg in (
            (device not in ("auto", "gpu", "cpu"), f"--data.device {device!r}: give auto, gpu "
                                                   "or cpu"),
            (batch_size < 1, f"--data.batch_size {batch_size}: give 1 or more"),
            (image_size < 16, f"--data.image_size {image_size}: give 16 or more pixels"),
            (shuffle_buffer < 1, f"--data.shuffle_buffer {shuffle_buffer}: give 1 or more"),
            (num_threads is not None and num_threads < 1, "--data.num_threads: give 1 or more"),
            (not 0 <= hw_decoder_load <= 1, "--data.hw_decoder_load: give a share in [0, 1]"),
        ) if bad]
        if problems:
            raise DataError("; ".join(problems))
        self.shard_set = ShardSet.open(shards)  # reads JSON only: no CUDA before the trainer
        self.shard_set.manifest.roles(fold)  # refuses a fold the shards do not have
        self.batch_size, self.image_size = batch_size, image_size
        self.device, self.num_threads, self.seed = device, num_threads, seed
        self.model_name, self.channels_last = model_name, channels_last
        self.augment = augment or Augment()
        self.shuffle_buffer, self.hw_decoder_load = shuffle_buffer, hw_decoder_load
        self.fold = fold
        self.loaders: dict[str, DaliLoader] = {}
        self.picked: str | None = None
        self._resume: str | None = None  # this rank's DALI checkpoint, from load_state_dict
        self._build: tuple[PipeSpec, int, int] | None = None  # (base spec, world, threads)

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
            raise DataError("--data.device gpu, but no CUDA GPU is visible; use --data.device "
                            "cpu (or auto) to run the same pipeline on the CPU")
        if device == "gpu" and not on_cuda:
            raise DataError("--data.device gpu needs the trainer on the GPU "
                            "(--trainer.accelerator gpu)")
        device_id = t.strategy.root_device.index if device == "gpu" else None
        fp16 = bool(t) and str(t.precision) in ("16-mixed", "16-true", "16")
        return rank, world, local_world, device, device_id, fp16

    def _base_seed(self) -> int:
        """data.seed, else the run's seed_everything (Lightning exports it), else 0."""
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def setup(self, stage: str | None = None) -> None:
        rank, world, local_world, device, device_id, fp16 = self._placement()
        if self.picked is None:
            log.info("DALI on %s (rank %d of %d)", device if device == "cpu" else
                     f"gpu:{device_id}", rank, world)
        self.picked = device
        threads = self.num_threads or max(1, (os.cpu_count() or 1) // local_world)
        norm, seed = preprocessing(self.model_name), self._base_seed()
        base = PipeSpec(tars=[], indexes=[], batch_size=self.batch_size,
                        image_size=self.image_size, mean=norm.mean, std=norm.std, train=False,
                        device=device, device_id=device_id, num_threads=threads, shard_id=rank,
                        num_shards=world, seed=seed + rank, order_seed=seed, fp16=fp16,
                        channels_last=self.channels_last, hw_decoder_load=self.hw_decoder_load,
                        augment=self.augment, exts=self._exts())
        self._build = (base, world, threads)
        for role in STAGE_ROLES.get(stage or "fit", ("train", "val", "test")):
            self._loader(role)

    def _loader(self, role: str) -> DaliLoader:
        """The loader of `role`, built on first use (e.g. validation for calibration at test)."""
        if role not in self.loaders:
            base, world, threads = self._build
            self.loaders[role] = DaliLoader(self._spec(base, role, world, threads))
        return self.loaders[role]

    def check(self, stage: str) -> None:
        """What kvasir-train checks before the Trainer starts (and prints its start-up lines):
        every shard `stage` will read against the manifest (`fit` tests after training, so its
        test split too), and for `fit` a training batch. setup() checks again, cached."""
        roles = ("train", "val", "test") if stage == "fit" else STAGE_ROLES.get(stage, ())
        for role in roles:
            self.shard_set.files(role, self.fold, self.num_threads or os.cpu_count() or 1)
        if stage == "fit":
            self.check_batch()

    def check_batch(self, world: int = 1) -> None:
        """Every rank's share of the training split holds a batch (world=1: the whole split,
        before the world size is known)."""
        count = self.shard_set.count("train", self.fold)
        if count // world < self.batch_size:
            raise DataError(f"--data.batch_size {self.batch_size} is larger than a rank's share "
                            f"of the training split ({count // world} of {count} samples over "
                            f"{world} ranks); lower it")

    def _exts(self) -> tuple[str, str]:
        comp = self.shard_set.manifest.components
        return (comp.image, comp.label)

    def _spec(self, base: PipeSpec, role: str, world: int, threads: int) -> PipeSpec:
        files = self.shard_set.files(role, self.fold, threads)  # checked against the manifest
        if role == "train":
            self.check_batch(world)
        spec = replace(base, tars=files.tars, indexes=files.indexes, train=role == "train",
                       shuffle_buffer=max(1, min(self.shuffle_buffer, -(-files.count // world))))
        return replace(spec, checkpoint=self._resume) if role == "train" else spec

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
        return self._loader("train")

    def val_dataloader(self) -> DaliLoader:
        return self._loader("val")

    def test_dataloader(self) -> DaliLoader:
        return self._loader("test")
