"""The data sets benchmarks/scale.py measures on, and the perceptual-hash statistics that
explain what the near-duplicate search costs on them.

`tiny`: shard_tools.synth.render frames at 64x64 (1.4 ms each, where a full-size frame takes
300: the same scenes, so their perceptual hashes are as alike as the full-size frames'), with
planted near and exact duplicates. `bytes`: shard_tools.synth's full-size frames. Each is made
once at its largest N; smaller N are hard-linked subsets of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scale.py imports this module: a run-time import back would be circular
    from scale import BenchSpec

SETS = ("tiny", "bytes")
TINY_SIDE = 64
TINY_VERSION = 3  # of _tiny_jpeg: a kept tiny set of another version is made again
Sources = dict[str, list[tuple[int, Path]]]  # set -> (N, source folder) per N


def _tiny_jpeg(c: int, k: int) -> bytes:
    """Image k of class c, quality 90; k % 100 == 99: file k - 1 re-encoded at quality 72 (a
    near duplicate), k % 250 == 248: file k - 1's very bytes (an exact duplicate)."""
    from PIL import Image

    from shard_tools.synth import KVASIR_CLASSES, render

    if k % 250 == 248:
        return _tiny_jpeg(c, k - 1)
    buf = io.BytesIO()
    if k % 100 == 99:
        Image.open(io.BytesIO(_tiny_jpeg(c, k - 1))).save(buf, "JPEG", quality=72)
    else:
        pixels = render(KVASIR_CLASSES[c], np.random.default_rng([11, c, k]), TINY_SIDE,
                        TINY_SIDE)
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tiny_chunk(job: tuple[str, int, int, int]) -> list[tuple[int, int, str, str, str]]:
    """Write images k0..k1-1 of class c; (k, c, rel, sha256, phash) of each."""
    from PIL import Image

    from shard_tools.imagecheck import phash
    from shard_tools.synth import KVASIR_CLASSES

    out, c, k0, k1 = job
    rows = []
    for k in range(k0, k1):
        data = _tiny_jpeg(c, k)
        rel = f"{KVASIR_CLASSES[c]}/{k:06d}.jpg"
        (Path(out) / rel).write_bytes(data)
        rows.append((k, c, rel, hashlib.sha256(data).hexdigest(),
                     phash(Image.open(io.BytesIO(data)).convert("RGB"))))
    return rows


def tiny_hashes(folder: Path) -> Path:
    """The tiny set's hash rows (rel, cls, sha256, phash), the input of the `dup` step."""
    return folder / f"hashes-v{TINY_VERSION}.json"


def make_tiny(folder: Path, per_class: int, workers: int) -> list[dict]:
    """The tiny set in folder/all (reused when complete); its hash rows, classes interleaved
    (the first N rows hold N/8 of each class)."""
    from shard_tools.synth import KVASIR_CLASSES

    meta = tiny_hashes(folder)
    if meta.is_file() and len(rows := json.loads(meta.read_text())) >= 8 * per_class:
        return rows[: 8 * per_class]  # a larger kept set: its first files are this one
    shutil.rmtree(folder, ignore_errors=True)
    for cls in KVASIR_CLASSES:
        (folder / "all" / cls).mkdir(parents=True)
    step = 500
    jobs = [(str(folder / "all"), c, k, min(k + step, per_class))
            for c in range(8) for k in range(0, per_class, step)]
    t0 = time.perf_counter()
    with get_context("fork").Pool(workers) as pool:
        got = [r for chunk in pool.imap_unordered(_tiny_chunk, jobs) for r in chunk]
    got.sort()  # by (k, c): interleaved classes
    rows = [{"rel": r[2], "cls": KVASIR_CLASSES[r[1]], "sha256": r[3], "phash": r[4]}
            for r in got]
    meta.write_text(json.dumps(rows))
    print(f"  tiny set: {len(rows)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def make_bytes(folder: Path, per_class: int, workers: int) -> Path:
    """shard_tools.synth's set in folder/all (a kept one reused when it has enough images per
    class; subsets are then drawn from it)."""
    from shard_tools.synth import synth

    done = folder / ".done"
    if done.is_file() and int(done.read_text()) >= per_class:
        return folder / "all"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    synth(folder / "all", per_class=per_class, seed=0, workers=workers)
    done.write_text(str(per_class))
    print(f"  bytes set: {8 * per_class} images in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder / "all"


def subset(all_dir: Path, per_class: int) -> Path:
    """all_dir's first per_class files (by name) of each class, hard-linked: a source of N."""
    sub = all_dir.parent / f"n{8 * per_class}"
    if sub.is_dir():
        return sub
    tmp = all_dir.parent / f".{sub.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for cls_dir in sorted(p for p in all_dir.iterdir() if p.is_dir()):
        (tmp / cls_dir.name).mkdir(parents=True)
        for f in sorted(cls_dir.iterdir())[:per_class]:
            os.link(f, tmp / cls_dir.name / f.name)
    tmp.rename(sub)
    return sub


def prepare(spec: BenchSpec, work: Path) -> tuple[Sources, Path | None, dict | None]:
    """The sources of every N per set; the tiny set's hash file when `dup` runs; the hash
    statistics when the tiny set was made (for `dup` or as a set)."""
    workers = spec.worker_count()
    sources: Sources = {}
    bytes_all, tiny_rows = None, []
    if "tiny" in spec.sets or "dup" in spec.steps:
        largest = max(spec.tiny_n + spec.dup_n if "dup" in spec.steps else spec.tiny_n)
        tiny_rows = make_tiny(work / "tiny", -(-largest // 8), workers)
        if "tiny" in spec.sets:
            sources["tiny"] = [(8 * (n // 8), subset(work / "tiny" / "all", n // 8))
                               for n in spec.tiny_n]
    if "bytes" in spec.sets:
        bytes_all = make_bytes(work / "bytes", max(spec.bytes_per_class), workers)
        sources["bytes"] = [(8 * pc, subset(bytes_all, pc)) for pc in spec.bytes_per_class]
    realism = hash_realism(tiny_rows, bytes_all) if tiny_rows else None
    return sources, tiny_hashes(work / "tiny") if "dup" in spec.steps else None, realism


# ---- how alike the hashes are: what the near-duplicate search has to compare -------------
def _hash_bits(hashes: list[str]) -> np.ndarray:
    """Hex hashes as one row of bits each."""
    return np.unpackbits(np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in hashes]),
                         axis=1)


def candidate_pairs(hashes: list[str], blocks: int = 17) -> int:
    """Pairs that share a block value in the near-duplicate index, counted per block: the
    comparisons the index makes (16 bits -> 17 blocks of the 256, dealt by entropy as
    shard_tools.split does: its own functions, so this counts what it really compares)."""
    from shard_tools.split import _block_values, _blocks

    packed = np.stack([np.frombuffer(bytes.fromhex(x), np.uint8) for x in hashes])
    total = 0
    for bits in _blocks(packed, blocks):
        counts = np.unique(_block_values(packed, bits), return_counts=True)[1]
        total += int((counts * (counts - 1) // 2).sum())
    return total


def hash_stats(hashes: list[str]) -> dict:
    """Pairwise Hamming distances of 256-bit hashes: how alike distinct images hash."""
    bits = _hash_bits(hashes).astype(np.int16)
    d = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    np.fill_diagonal(d, 10**6)
    nearest = d.min(1)
    pairs = len(hashes) * (len(hashes) - 1) // 2
    return {"images": len(hashes), "mean_pair_bits": round(float(d[d < 10**6].mean()), 1),
            "nearest_min_bits": int(nearest.min()),
            "nearest_median_bits": float(np.median(nearest)),
            "bit_bias": round(float(np.abs(bits.mean(0) - 0.5).mean()), 3),
            "block_pair_share": round(candidate_pairs(hashes) / pairs, 4)}


def hash_realism(tiny_rows: list[dict], bytes_all: Path | None, k: int = 256) -> dict:
    """The tiny set's hashes next to the synthetic Kvasir frames' (same sample size)."""
    from PIL import Image

    from shard_tools.imagecheck import phash

    out = {"note": "dup runs on shard_tools.imagecheck.phash of the tiny set's JPEGs "
                   "(shard_tools.synth.render frames at 64x64)"}
    if bytes_all is not None:
        per_class = [sorted(d.iterdir()) for d in sorted(bytes_all.iterdir()) if d.is_dir()]
        files = [f for group in zip(*per_class) for f in group][:k]
        out["synth_frames"] = hash_stats([phash(Image.open(f).convert("RGB")) for f in files])
        k = len(files)
    out["tiny"] = hash_stats([r["phash"] for r in tiny_rows[:k]])
    return out
