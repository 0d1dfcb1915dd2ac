"""`kvasir-train preview`: what the model sees, before spending GPU hours.

Takes a few training samples (one per class, from the first training shard), runs each through
the evaluation graph (the original, only resized) and `versions` times through the training
graph with the experiment's augmentation, undoes the normalization and draws them in a grid:
one row per sample, the original first. Runs on the CPU graph.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from shard_tools.manifest import Components, key_name, unpack_label
from shard_tools.tario import parse_index

from .data import KvasirDataModule
from .model import preprocessing
from .pipeline import PipeSpec, build_pipeline


def _first_of_each_class(tar: str, idx: str, comp: Components,
                         limit: int) -> list[tuple[str, int, bytes]]:
    """(key, label, jpeg bytes) of the first sample of each class in `tar`, up to `limit`,
    read through its DALI index (the same members DALI reads)."""
    out, seen = [], set()
    with open(tar, "rb") as fh:
        for row in parse_index(Path(idx).read_text(), idx):
            parts = {m.ext: m for m in row}

            def member(ext: str, parts=parts) -> bytes:
                fh.seek(parts[ext].offset)
                return fh.read(parts[ext].size)

            label, number = unpack_label(member(comp.label))
            if label not in seen:
                seen.add(label)
                out.append((key_name(number), label, member(comp.image)))
            if len(out) == limit:
                break
    return sorted(out, key=lambda t: t[1])


def _images(spec: PipeSpec) -> np.ndarray:
    """One batch of the graph as uint8 (N, S, S, 3), normalization undone."""
    pipe = build_pipeline(spec)
    x = np.array(pipe.run()[0].as_tensor(), np.float32)  # (N, 3, S, S)
    x = x * np.array(spec.std)[:, None, None] + np.array(spec.mean)[:, None, None]
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def preview(dm: KvasirDataModule, out: str | Path, samples: int = 8, versions: int = 5,
            seed: int = 0) -> Path:
    """Write the grid PNG to `out`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = dm.shard_set.files("train", dm.fold)
    picked = _first_of_each_class(files.tars[0], files.indexes[0], files.components, samples)
    norm = preprocessing(dm.model_name)
    base = PipeSpec(tars=[], indexes=[], batch_size=1, image_size=dm.image_size, mean=norm.mean,
                    std=norm.std, train=False, num_threads=2, seed=seed, augment=dm.augment)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvasir-preview-") as tmp:
        for i, (key, label, jpg) in enumerate(picked):
            path = Path(tmp) / f"{key}.jpg"
            path.write_bytes(jpg)
            original = _images(replace(base, files=(str(path),)))[0]
            augmented = _images(replace(base, files=(str(path),) * versions, train=True,
                                        batch_size=versions, seed=seed + i))
            rows.append((dm.classes[label], key, original, augmented))
    n = len(rows)
    fig, axes = plt.subplots(n, versions + 1, figsize=(1.6 * (versions + 1), 1.7 * n + 0.5),
                             squeeze=False)
    for r, (cls, key, original, augmented) in enumerate(rows):
        for c, img in enumerate([original, *augmented]):
            ax = axes[r, c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"{cls}\n#{key}", fontsize=7)
    axes[0, 0].set_title("original\n(evaluation graph)", fontsize=8)
    for c in range(1, versions + 1):
        axes[0, c].set_title(f"training {c}", fontsize=8)
    fig.suptitle(f"DALI training augmentation at {dm.image_size} px "
                 "(normalization undone)", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    from PIL import Image  # a 256-colour palette: a third of the size, same look

    Image.open(out).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(out, optimize=True)
    return out
