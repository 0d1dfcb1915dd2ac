"""`kvasir-shard synth`: a synthetic data set in the Kvasir v2 layout, for demos and tests.

The real set cannot be downloaded here, so this one imitates what matters to a loader and a
model: Kvasir's eight class folders, its mix of resolutions, endoscopy-like frames (a bright,
textured, reddish field inside a dark round border, specular highlights, a green inset box on
some colon frames) and its compression, about 2-4 bits per pixel, because JPEG decode cost
follows bits per pixel. Classes differ by colour, texture and lesion shape, so a small model
has to learn something. Deterministic for a given seed.
"""

from __future__ import annotations

import io
import os
import uuid
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .parallel import quiet_worker

KVASIR_CLASSES = (
    "dyed-lifted-polyps", "dyed-resection-margins", "esophagitis", "normal-cecum",
    "normal-pylorus", "normal-z-line", "polyps", "ulcerative-colitis",
)
# (width, height) and their share in Kvasir v2: 5137 x 720x576, 2122 x 1280x1024, the rest mixed.
RESOLUTIONS = ((720, 576), (1280, 1024), (1920, 1072), (1350, 1080), (768, 576))
RESOLUTION_P = (0.64, 0.265, 0.045, 0.03, 0.02)
_COLON = {"dyed-lifted-polyps", "dyed-resection-margins", "normal-cecum", "polyps",
          "ulcerative-colitis"}
# Mean tissue colour (RGB) per class; each frame gets a random gain around it.
_BASE = {
    "dyed-lifted-polyps": (205, 110, 100), "dyed-resection-margins": (215, 150, 135),
    "esophagitis": (215, 140, 128), "normal-cecum": (225, 150, 110),
    "normal-pylorus": (210, 122, 108), "normal-z-line": (212, 135, 122),
    "polyps": (200, 102, 90), "ulcerative-colitis": (192, 72, 62),
}


@dataclass(frozen=True)
class SynthJob:
    out: str
    cls: str
    index: int
    seed: int


def _smooth(rng: np.random.Generator, h: int, w: int, cells: int = 8) -> np.ndarray:
    """Low-frequency noise in [-1, 1], shape (h, w)."""
    small = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, "F").resize((w, h), Image.Resampling.BICUBIC))


def _lesion(cls: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, img: np.ndarray,
            r: np.ndarray) -> None:
    """Paint the class's structure in place. x, y: (h, w) coords in [-1, 1]; r = hypot."""
    cx, cy = rng.uniform(-0.35, 0.35, 2)
    d = np.hypot(x - cx, y - cy)
    ang = np.arctan2(y - cy, x - cx)
    wobble = 1 + 0.15 * np.sin(ang * rng.integers(3, 7) + rng.uniform(0, 6.3))
    rad = rng.uniform(0.18, 0.32)
    blue = np.array([60, 95, 175], np.float32)
    if cls == "dyed-lifted-polyps":  # a raised blue dome with a bright rim
        m = np.clip((rad * wobble - d) / 0.05, 0, 1)[..., None]
        img[:] = img * (1 - 0.85 * m) + blue * 0.85 * m
        img += (40 * np.exp(-((d - rad * 0.7) / 0.03) ** 2))[..., None]
    elif cls == "dyed-resection-margins":  # a pale scar inside a ragged blue ring
        ring = np.exp(-((d - rad * wobble) / 0.07) ** 2)[..., None]
        img[:] = img * (1 - 0.8 * ring) + blue * 0.8 * ring
        core = np.clip((rad * 0.6 - d) / 0.05, 0, 1)[..., None]
        img[:] = img * (1 - 0.6 * core) + np.array([235, 215, 200], np.float32) * 0.6 * core
    elif cls == "esophagitis":  # red linear erosions running from the lumen
        streak = np.clip(np.cos(ang * rng.integers(5, 9)) - 0.75, 0, 1) * 4
        m = (streak * np.clip(d / 0.2, 0, 1))[..., None]
        img[:] = img * (1 - 0.7 * m) + np.array([170, 35, 35], np.float32) * 0.7 * m
    elif cls == "normal-cecum":  # concentric haustral folds
        folds = (0.5 + 0.5 * np.cos(d * rng.uniform(18, 26)))[..., None]
        img[:] = img * (1 - 0.35 * folds)
    elif cls == "normal-pylorus":  # a dark round opening with radial folds
        hole = np.clip((rad * 0.55 - d) / 0.04, 0, 1)[..., None]
        img *= (1 - 0.2 * (0.5 + 0.5 * np.cos(ang * 10)) * np.exp(-d / 0.4))[..., None]
        img[:] = img * (1 - 0.9 * hole) + np.array([30, 12, 12], np.float32) * 0.9 * hole
    elif cls == "normal-z-line":  # pale squamous above, red columnar below, wavy border
        border = cy + 0.1 * np.sin(x * rng.uniform(6, 10) + rng.uniform(0, 6.3))
        m = np.clip((y - border) / 0.03, 0, 1)[..., None]
        img[:] = img * (1 - m) + (img * np.array([0.85, 0.45, 0.45], np.float32)) * m
        img[:] = img * m + np.minimum(img * 1.12, 255) * (1 - m)
    elif cls == "polyps":  # a red, shaded, round bulge
        m = np.clip((rad * wobble - d) / 0.03, 0, 1)[..., None]
        shade = (1 + 0.5 * np.clip(-(x - cx + y - cy) / rad, -1, 1))[..., None]
        img[:] = img * (1 - m) + np.array([175, 55, 50], np.float32) * shade * m
    elif cls == "ulcerative-colitis":  # granular mucosa with white-yellow exudate spots
        spots = np.zeros_like(r)
        h, w = r.shape
        for _ in range(int(rng.integers(40, 90))):
            sx, sy = rng.integers(0, w), rng.integers(0, h)
            s = int(rng.integers(3, 12) * w / 720)
            spots[max(0, sy - s) : sy + s, max(0, sx - s) : sx + s] = 1
        img[:] = img * (1 - 0.75 * spots[..., None]) + np.array(
            [240, 228, 190], np.float32) * 0.75 * spots[..., None]


def render(cls: str, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """One frame as (h, w, 3) uint8."""
    y, x = np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j].astype(np.float32)
    x *= w / h  # square pixels: x spans wider than y on a landscape frame
    r = np.hypot(x, y)
    base = np.array(_BASE[cls], np.float32) * rng.uniform(0.88, 1.12, 3)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    img *= (1 + 0.18 * _smooth(rng, h, w))[..., None]  # uneven lighting
    img *= (1 - 0.45 * np.clip(r / 1.3, 0, 1) ** 2)[..., None]  # darker towards the border
    _lesion(cls, rng, x / (w / h), y, img, r)
    # Mucosal texture: the high-frequency detail that sets bits per pixel (2-4 bpp at q90-95).
    sigma = rng.uniform(9, 14) * (1.5 if cls == "ulcerative-colitis" else 1.0)
    img += rng.normal(0, sigma, (h, w, 1)).astype(np.float32) * np.array([1, 0.8, 0.8], np.float32)
    for _ in range(int(rng.integers(3, 9))):  # specular highlights
        sx, sy = rng.uniform(-1.1, 1.1), rng.uniform(-0.8, 0.8)
        img += (255 * np.exp(-(np.hypot(x - sx, y - sy) / rng.uniform(0.01, 0.04)) ** 2))[..., None]
    field = np.clip((rng.uniform(1.05, 1.2) - np.hypot(x / (w / h) * 1.1, y)) / 0.02, 0, 1)
    img *= field[..., None]  # the scope's dark round border
    img += rng.normal(0, 2.0, (h, w, 1)).astype(np.float32)  # sensor noise in the black too
    if cls in _COLON and rng.random() < 0.5:  # ScopeGuide inset, lower left, as in Kvasir
        bw, bh = int(w * 0.22), int(h * 0.27)
        img[h - bh - 4 : h - 4, 4 : 4 + bw] = (35, 140, 60)
        img[h - bh + 10 : h - 20, 20 : bw - 10, 1] += 60
    return np.clip(img, 0, 255).astype(np.uint8)


def _job(job: SynthJob) -> int:
    ci = KVASIR_CLASSES.index(job.cls)
    rng = np.random.default_rng([job.seed, ci, job.index])
    w, h = RESOLUTIONS[rng.choice(len(RESOLUTIONS), p=RESOLUTION_P)]
    pixels = render(job.cls, rng, w, h)
    name = uuid.UUID(bytes=rng.bytes(16), version=4)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=int(rng.integers(90, 96)))
    (Path(job.out) / job.cls / f"{name}.jpg").write_bytes(buf.getvalue())
    return len(buf.getvalue())


def synth(out: str | os.PathLike, per_class: int, seed: int = 0, workers: int = 0) -> dict:
    """Write `per_class` JPEGs into each class folder of `out`; return size statistics."""
    if per_class < 1:
        raise ValueError("--per-class must be at least 1")
    out = Path(out)
    for cls in KVASIR_CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
    jobs = [SynthJob(str(out), c, i, seed) for c in KVASIR_CLASSES for i in range(per_class)]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc="synth", unit="img", dynamic_ncols=True, leave=False)
    sizes = []
    with get_context("fork").Pool(workers, quiet_worker) as pool:
        for n in pool.imap(_job, jobs, chunksize=2):
            sizes.append(n)
            bar.update()
    bar.close()
    return {"images": len(jobs), "bytes": int(sum(sizes))}
