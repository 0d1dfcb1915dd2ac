"""`kvasir-shard build`: a Kvasir-layout folder or zip -> split, verified WebDataset shards.

Output (see README "Shard format"):
    OUT/<split>/<name>-NNNNNN.tar   samples `<key>.cls` (label, decimal text), `<key>.jpg`
                                    (baseline RGB JPEG), `<key>.lbl` (label and key as two
                                    int64 little endian, so DALI reads both as one tensor)
    OUT/<split>/<name>-NNNNNN.idx   DALI index v1.2
    OUT/manifest.json, OUT/samples.csv
Every source file is packed or rejected with a reason; the same input and options give
byte-identical tars, index files and CSV.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import random
import shutil
import struct
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from . import FORMAT_VERSION, __version__
from .imagecheck import Verdict, convert, inspect
from .parallel import pool_map, worker_source
from .source import Source, open_source
from .split import Item, assign_splits, duplicate_groups
from .tario import format_index, write_tar

SPLITS = ("train", "val", "test")
CSV_COLUMNS = ["key", "split", "label", "class", "source", "width", "height", "sha256",
               "converted", "reason", "packed_width", "packed_height", "packed_bytes", "shard"]


class BuildError(RuntimeError):
    """A build failure the user can act on; the message says what and where."""


@dataclass(frozen=True)
class BuildSpec:
    """Options of one build; saved in the manifest."""

    src: str
    out: str
    val_fraction: float = 0.2
    test_fraction: float = 0.104
    seed: int = 0
    shard_bytes: int = 256 * 2**20  # target tar size; a shard closes before passing it
    max_side: int = 0  # 0: keep full resolution; else downscale larger images to this side
    name: str = "kvasir"
    workers: int = 0  # 0: all cores
    overwrite: bool = False


@dataclass
class Record:
    """One source file and what happened to it."""

    rel: str
    cls: str | None
    size: int
    verdict: Verdict | None = None
    reject: str = ""


# ---- worker side (see parallel.py) -------------------------------------------------------
def _inspect_job(job: tuple[str, int]) -> Verdict:
    rel, max_side = job
    return inspect(worker_source().read(rel), max_side)


def _pack_job(job: tuple[str, bool, int]) -> tuple[bytes, int, int]:
    rel, needs_convert, max_side = job
    data = worker_source().read(rel)
    if not needs_convert:
        return data, 0, 0
    return convert(data, max_side)


# ---- the build ----------------------------------------------------------------------------
def _scan(source: Source, spec: BuildSpec, workers: int) -> list[Record]:
    records = [Record(f.rel, f.cls, f.size) for f in source.files()]
    todo = [r for r in records if r.cls is not None]
    for r in records:
        if r.cls is None:
            r.reject = "not inside a class folder"
    verdicts = pool_map(_inspect_job, [(r.rel, spec.max_side) for r in todo], source, workers,
                         "decode+check")
    for r, v in zip(todo, verdicts):
        r.verdict = v
        if not v.ok:
            r.reject = v.error
    return records


def _write_split(
    split: str, recs: list[Record], keys: dict[str, str], labels: dict[str, int], tmp: Path,
    ctx: tuple[Source, BuildSpec, int],
) -> tuple[list[dict], list[dict]]:
    """Write one split's shards; return manifest shard entries and CSV rows."""
    source, spec, workers = ctx
    (tmp / split).mkdir()
    jobs = [(r.rel, r.verdict.convert, spec.max_side) for r in recs]
    shards: list[dict] = []
    rows: list[dict] = []
    current: list[tuple[str, dict[str, bytes]]] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        stem = f"{split}/{spec.name}-{len(shards):06d}"
        tar_path, idx_path = tmp / f"{stem}.tar", tmp / f"{stem}.idx"
        index = write_tar(tar_path, current)
        idx_path.write_text(format_index(index))
        digest = hashlib.sha256(tar_path.read_bytes()).hexdigest()
        shards.append({"tar": f"{stem}.tar", "idx": f"{stem}.idx", "count": len(current),
                       "bytes": tar_path.stat().st_size, "sha256": digest})
        current, size = [], 0

    packed = pool_map(_pack_job, jobs, source, workers, f"pack {split}")
    for r, (data, pw, ph) in zip(recs, packed):
        v = r.verdict
        label = labels[r.cls]
        key = keys[r.rel]
        sample = {"cls": str(label).encode(), "jpg": data,
                  "lbl": struct.pack("<qq", label, int(key))}
        need = len(data) + 3 * 512 + 1024  # member headers and padding
        if current and size + need > spec.shard_bytes:
            flush()
        current.append((key, sample))
        size += need
        rows.append({
            "key": key, "split": split, "label": label, "class": r.cls, "source": r.rel,
            "width": v.width, "height": v.height, "sha256": v.sha256,
            "converted": int(v.convert), "reason": "; ".join(v.reasons),
            "packed_width": pw or v.width, "packed_height": ph or v.height,
            "packed_bytes": len(data), "shard": f"{split}/{spec.name}-{len(shards):06d}.tar",
        })
    if current:
        flush()
    return shards, rows


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BuildError(f"{out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished build into place; an existing OUT goes only after that succeeds."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def build(spec: BuildSpec) -> dict:
    """Run a build; return the manifest. Raises BuildError for problems the user can fix."""
    t0 = time.perf_counter()
    source = open_source(spec.src)
    workers = spec.workers or os.cpu_count() or 1
    out = Path(spec.out)
    try:
        tmp = _prepare_out(out, spec.overwrite)
    except OSError as exc:
        raise BuildError(_disk_message(exc, out)) from exc
    try:
        manifest = _build_into(tmp, source, spec, workers)
        _commit(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(_disk_message(exc, out)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["_elapsed_s"] = time.perf_counter() - t0
    manifest["_workers"] = workers
    return manifest


def _disk_message(exc: OSError, out: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the disk while writing {out}: free space or choose another OUT"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write to {out} ({exc.strerror}): choose a writable OUT folder"
    return f"I/O error while building {out}: {exc}"


def _build_into(tmp: Path, source: Source, spec: BuildSpec, workers: int) -> dict:
    records = _scan(source, spec, workers)
    good = [r for r in records if not r.reject]
    if not good:
        raise BuildError(f"no decodable image found under {spec.src} "
                         "(expected <root>/<class>/<image files>)")
    classes = sorted({r.cls for r in good})
    labels = {c: i for i, c in enumerate(classes)}
    items = [Item(r.rel, r.cls, r.verdict.sha256, r.verdict.phash) for r in good]
    groups = duplicate_groups(items)
    splits = assign_splits(items, groups, spec.val_fraction, spec.test_fraction, spec.seed)
    keys = {r.rel: f"{n:06d}" for n, r in enumerate(good)}  # `good` is sorted by path
    manifest_splits, all_rows = {}, []
    for split in SPLITS:
        recs = [r for r, s in zip(good, splits) if s == split]
        random.Random(f"{spec.seed}:order:{split}").shuffle(recs)  # DALI shuffles in a buffer only
        if not recs:
            manifest_splits[split] = {"count": 0, "shards": []}
            continue
        shards, rows = _write_split(split, recs, keys, labels, tmp, (source, spec, workers))
        manifest_splits[split] = {"count": len(recs), "shards": shards}
        all_rows += rows
    _write_csv(tmp / "samples.csv", all_rows)
    manifest = {
        "format": "kvasir-dali-shards", "format_version": FORMAT_VERSION,
        "created_by": f"kvasir-shard {__version__}",
        "classes": classes, "source": str(source.origin), "source_files": len(records),
        "components": {"image": "jpg", "label": "lbl", "label_text": "cls"},
        "splits": manifest_splits,
        "rejected": [{"path": r.rel, "reason": r.reject} for r in records if r.reject],
        "converted": dict(Counter(x for r in good for x in r.verdict.reasons)),
        "duplicate_groups": [{"members": [items[i].rel for i in g],
                              "splits": sorted({splits[i] for i in g}),
                              "exact": len({items[i].sha256 for i in g}) == 1} for g in groups],
        "options": {k: v for k, v in asdict(spec).items() if k not in ("src", "out", "workers",
                                                                      "overwrite")},
        "class_counts": {s: dict(Counter(r["class"] for r in all_rows if r["split"] == s))
                         for s in SPLITS},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["_records"] = records
    return manifest


def _write_csv(path: Path, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: r["key"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())
