"""The loaders that benchmarks/throughput.py compares, each yielding (images, labels) batches.

- dali:      the project's own DALI training pipeline (CPU or GPU graph)
- torch-pil: a PyTorch DataLoader over the original JPEG folder, PIL decode + albumentations
             (how the reference write-up loaded its data; the baseline for every ratio)
- wds-pil:   the webdataset library over the same shards, same PIL + albumentations work
- torch-nvjpeg: a DataLoader reading the JPEG folder's bytes, torchvision's batched nvJPEG
             decode on the GPU and torchvision v2 augmentations there (the GPU peer of dali-gpu)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kvasir_dali.augment import Augment
from kvasir_dali.shards import ShardSet
from shard_tools.manifest import samples

# Each loader imports its own libraries inside the function that builds it (albumentations for
# torch-pil and wds-pil, webdataset for wds-pil, torchvision for torch-nvjpeg, DALI for dali-*),
# so a machine that lacks one of them still times the others.


def norm(model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of [0, 1] pixels from the model's timm config (no DALI needed)."""
    from kvasir_dali.model import preprocessing

    p = preprocessing(model)
    return p.mean, p.std


def albumentations_train(size: int, mean, std):
    """The same augmentations as the DALI training graph, in albumentations."""
    import albumentations as A

    aug = Augment()
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=aug.scale, ratio=aug.ratio),
        A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.Transpose(p=0.5),
        A.Rotate(limit=aug.rotate, p=aug.rotate_p, border_mode=0),
        A.ColorJitter(brightness=aug.brightness, contrast=aug.contrast,
                      saturation=aug.saturation, hue=aug.hue / 360, p=aug.jitter_p),
        A.Normalize(mean=mean, std=std),
    ])


def _to_tensor(img: Image.Image, tf) -> torch.Tensor:
    x = tf(image=np.asarray(img.convert("RGB")))["image"]  # (S, S, 3) float32
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


class JpegSplit(torch.utils.data.Dataset):
    """The training split's source files, read from the original folder: (path, label)."""

    def __init__(self, shards: Path) -> None:
        src = Path(ShardSet.open(shards).manifest.source)
        self.items = [(src / r.source, r.label) for r in samples(shards) if r.split == "train"]

    def __len__(self) -> int:
        return len(self.items)


class JpegFolder(JpegSplit):
    """Decoded by PIL and augmented by albumentations: (tensor, label)."""

    def __init__(self, shards: Path, size: int, mean, std) -> None:
        super().__init__(shards)
        self.tf = albumentations_train(size, mean, std)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return _to_tensor(Image.open(path), self.tf), label


class JpegBytes(JpegSplit):
    """The same files undecoded: (bytes, label). Plain bytes, not tensors: workers would pass
    every small tensor as a file descriptor."""

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return path.read_bytes(), label


class NvjpegLoader:
    """Batches decoded by torchvision.io.decode_jpeg on `device`, augmented there per image."""

    def __init__(self, shards: Path, batch: int, size: int, workers: int, model: str,
                 device: str = "cuda") -> None:
        from torchvision.transforms import v2

        mean, std = norm(model)
        aug = Augment()
        ds = JpegBytes(shards)
        self.dl = torch.utils.data.DataLoader(
            ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
            persistent_workers=workers > 0, collate_fn=lambda b: ([x for x, _ in b],
                                                                  torch.tensor([y for _, y in b])))
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.tf = v2.Compose([
            v2.RandomResizedCrop(size, scale=aug.scale, ratio=aug.ratio, antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
            v2.RandomApply([v2.Lambda(lambda x: x.transpose(-1, -2))], p=0.5),
            v2.RandomApply([v2.RandomRotation(aug.rotate)], p=aug.rotate_p),
            v2.RandomApply([v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation,
                                           aug.hue / 360)], p=aug.jitter_p),
        ])
        self.half = self.device.type == "cuda"

    def __len__(self) -> int:
        return len(self.dl)

    def __iter__(self):
        from torchvision.io import decode_jpeg

        for data, labels in self.dl:
            data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
            images = decode_jpeg(data, device=self.device)  # list of (3, H, W) uint8
            x = torch.stack([self.tf(im) for im in images]).float().div_(255)
            x = (x - self.mean) / self.std
            yield (x.half() if self.half else x), labels.to(self.device, non_blocking=True)


def torch_nvjpeg(shards: Path, batch: int, size: int, workers: int, model: str,
                 device: str = "cuda") -> NvjpegLoader:
    return NvjpegLoader(shards, batch, size, workers, model, device)


def torch_pil(shards: Path, batch: int, size: int, workers: int, model: str):
    mean, std = norm(model)
    ds = JpegFolder(shards, size, mean, std)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers else None)


def wds_pil(shards: Path, batch: int, size: int, workers: int, model: str):
    import webdataset as wds

    mean, std = norm(model)
    tf = albumentations_train(size, mean, std)
    s = ShardSet.open(shards)
    urls = s.files("train").tars
    n_batches = s.count("train") // batch

    def decode(sample):
        return _to_tensor(Image.open(io.BytesIO(sample["jpg"])), tf), int(sample["cls"])

    ds = (wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False).shuffle(1000)
          .map(decode).batched(batch, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers,
                         persistent_workers=workers > 0).with_epoch(n_batches)


def dali(shards: Path, batch: int, size: int, threads: int, model: str, device: str = "cpu"):
    from kvasir_dali.loader import DaliLoader
    from kvasir_dali.pipeline import PipeSpec

    mean, std = norm(model)
    f = ShardSet.open(shards).files("train")
    spec = PipeSpec(tars=f.tars, indexes=f.indexes, batch_size=batch, image_size=size,
                    mean=mean, std=std, train=True, device=device,
                    device_id=0 if device == "gpu" else None, num_threads=threads,
                    fp16=device == "gpu", shuffle_buffer=f.count)
    return DaliLoader(spec)
