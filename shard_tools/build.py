"""`kvasir-shard build`: an image folder or zip -> split, verified WebDataset shards.

Output (the contract is `manifest.py`): `OUT/<split>/<name>-NNNNNN.tar` + `.idx`,
`OUT/manifest.json`, `OUT/samples.csv`. Every source file is packed or rejected with a reason;
the same input and options give byte-identical tars, index files and CSV. OUT is written
beside itself and swapped into place whole (`outdir.py`).
"""

from __future__ import annotations

import errno
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .errors import UserError
from .imagecheck import Verdict, convert, inspect
from .manifest import Manifest, Sample, Shard, Split, dump, key_name, pack_label, write_samples
from .outdir import staging
from .parallel import pool_map, worker_source
from .source import DEFAULT_MAX_FILE_MB, ReadError, Source, open_source
from .split import Item, assign_folds, assign_splits, duplicate_groups
from .splitfile import SplitFile, read_split_file
from .tario import TarWriter, format_index

HOLDOUT = ("train", "val", "test")
MIN_SHARD_BYTES = 2**20


class BuildError(UserError):
    """A build failure the user can act on; the message says what and where."""


@dataclass(frozen=True)
class BuildSpec:
    """Options of one build; those that shape the output are saved in the manifest."""

    src: str
    out: str
    val_fraction: float = 0.2
    test_fraction: float = 0.104
    seed: int = 0
    shard_bytes: int = 256 * 2**20  # target tar size; a shard closes before passing it
    max_side: int = 0  # 0: keep full resolution; else downscale larger images to this side
    name: str = "kvasir"
    folds: int = 0  # >= 2: K stratified folds of the non-test samples instead of train/val
    split_file: str = ""  # a published split to reuse (see splitfile.py)
    allow_missing: bool = False  # pack although the split file and the source disagree
    max_file_mb: float = DEFAULT_MAX_FILE_MB  # larger files are rejected unread
    workers: int = 0  # 0: all cores
    overwrite: bool = False

    def check(self) -> None:
        """BuildError for option values that cannot work, before any file is read."""
        problems = []
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            problems.append(f"--name {self.name!r}: use letters, digits, '-' and '_' only (it "
                            "starts every shard file name; DALI splits names at the first dot)")
        if self.shard_bytes < MIN_SHARD_BYTES:
            problems.append(f"--shard-mb {self.shard_bytes / 2**20:g}: give at least 1 (MiB)")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            problems.append("--val-fraction and --test-fraction must lie in [0, 1) and sum to "
                            "less than 1")
        if self.folds == 1 or not 0 <= self.folds <= 100:
            problems.append(f"--folds {self.folds}: give 2 or more (or 0 for train/val/test)")
        if self.max_side < 0 or 0 < self.max_side < 32:
            problems.append(f"--max-side {self.max_side}: give 0 (off) or at least 32 pixels")
        if self.max_file_mb <= 0 or self.workers < 0:
            problems.append("--max-file-mb must be positive and --workers 0 or more")
        if problems:
            raise BuildError("; ".join(problems))


@dataclass
class Record:
    """One source file and what happened to it."""

    rel: str
    cls: str | None
    size: int
    verdict: Verdict | None = None
    reject: str = ""
    split: str = ""  # the split (shard folder) it goes to
    fold: str = ""  # its fold, as text, in a folds layout


@dataclass
class BuildResult:
    """What `build` returns: the manifest written, every file's record, and the cost."""

    manifest: Manifest
    records: list[Record]
    elapsed_s: float
    workers: int

    @property
    def packed(self) -> int:
        return sum(s.count for s in self.manifest.splits.values())


# ---- worker side (see parallel.py) -------------------------------------------------------
def _inspect_job(job: tuple[str, int]) -> Verdict:
    rel, max_side = job
    try:
        return inspect(worker_source().read(rel), max_side)
    except ReadError as exc:
        return Verdict(sha256="", ok=False, error=str(exc))


def _pack_job(job: tuple[str, bool, int]) -> tuple[bytes, int, int]:
    rel, needs_convert, max_side = job
    data = worker_source().read(rel)
    if not needs_convert:
        return data, 0, 0
    return convert(data, max_side)


# ---- the build ----------------------------------------------------------------------------
def _scan(source: Source, spec: BuildSpec, workers: int) -> list[Record]:
    records = [Record(f.rel, f.cls, f.size, reject=f.reject) for f in source.files()]
    todo = [r for r in records if r.cls is not None]
    with pool_map(_inspect_job, [(r.rel, spec.max_side) for r in todo], source, workers,
                  "decode+check") as verdicts:
        for r, v in zip(todo, verdicts):
            r.verdict = v
            if not v.ok:
                r.reject = v.error
    return records


def _assign(good: list[Record], groups: list[list[int]], items: list[Item], spec: BuildSpec,
            published: SplitFile | None) -> tuple[str, int]:
    """Set each record's split (and fold); return (layout, folds)."""
    if published is not None:
        for r in good:
            r.split, r.fold = published.of(r.rel)
        return published.layout, published.folds
    if spec.folds:
        for r, f in zip(good, assign_folds(items, groups, spec.folds, spec.test_fraction,
                                           spec.seed)):
            r.split, r.fold = ("test", "") if f < 0 else (f"fold{f}", str(f))
        return "folds", spec.folds
    for r, s in zip(good, assign_splits(items, groups, spec.val_fraction, spec.test_fraction,
                                        spec.seed)):
        r.split = s
    return "holdout", 0


class _SplitWriter:
    """One split's samples -> tars that close before `spec.shard_bytes`, their index files, the
    manifest's shard entries and samples.csv rows. Samples stream into the open tar: memory
    holds one sample, and the tar's SHA-256 is taken as it is written."""

    def __init__(self, split: str, tmp: Path, spec: BuildSpec) -> None:
        self.split, self.tmp, self.spec = split, tmp, spec
        self.shards: list[Shard] = []
        self.rows: list[Sample] = []
        self.tar: TarWriter | None = None
        self.size = 0  # bytes the open tar will take
        (tmp / split).mkdir()

    def _stem(self) -> str:
        return f"{self.split}/{self.spec.name}-{len(self.shards):06d}"

    def flush(self) -> None:
        if self.tar is None:
            return
        stem = self._stem()
        index, digest, size = self.tar.close()
        (self.tmp / f"{stem}.idx").write_text(format_index(index))
        self.shards.append(Shard(f"{stem}.tar", f"{stem}.idx", len(index), size, digest))
        self.tar, self.size = None, 0

    def add(self, r: Record, packed: tuple[bytes, int, int], label: int, key: str) -> None:
        data, pw, ph = packed
        need = len(data) + 3 * 512 + 1024  # member headers and padding
        if self.tar is not None and self.size + need > self.spec.shard_bytes:
            self.flush()
        if self.tar is None:
            self.tar = TarWriter(self.tmp / f"{self._stem()}.tar")
        self.tar.add(key, {"cls": str(label).encode(), "jpg": data,
                           "lbl": pack_label(label, key)})
        self.size += need
        v = r.verdict
        self.rows.append(Sample(
            key=key, split="train" if r.fold else self.split, fold=r.fold, label=label,
            cls=r.cls, source=r.rel, width=v.width, height=v.height, sha256=v.sha256,
            converted=int(v.convert), reason="; ".join(v.reasons), packed_width=pw or v.width,
            packed_height=ph or v.height, packed_bytes=len(data), shard=f"{self._stem()}.tar"))


def _write_split(split: str, recs: list[Record], labels: dict[str, int], keys: dict[str, str],
                 tmp: Path, ctx: tuple[Source, BuildSpec, int]) -> tuple[list[Shard], list]:
    """Write one split's shards; return its shard entries and samples.csv rows."""
    source, spec, workers = ctx
    writer = _SplitWriter(split, tmp, spec)
    jobs = [(r.rel, r.verdict.convert, spec.max_side) for r in recs]
    with pool_map(_pack_job, jobs, source, workers, f"pack {split}") as packed:
        for r, result in zip(recs, packed):
            writer.add(r, result, labels[r.cls], keys[r.rel])
    writer.flush()
    return writer.shards, writer.rows


def _split_names(layout: str, folds: int) -> list[str]:
    return list(HOLDOUT) if layout == "holdout" else [f"fold{i}" for i in range(folds)] + ["test"]


def _build_into(tmp: Path, source: Source, spec: BuildSpec, workers: int
                ) -> tuple[Manifest, list[Record]]:
    published = read_split_file(spec.split_file) if spec.split_file else None
    records = _scan(source, spec, workers)
    if published is not None:
        published.match(records, spec.allow_missing)
    good = [r for r in records if not r.reject]
    if not good:
        raise BuildError(f"no decodable image found in a class folder of {spec.src} "
                         "(expected <folder>/<class>/<image files>)")
    classes = sorted({r.cls for r in good})
    labels = {c: i for i, c in enumerate(classes)}
    items = [Item(r.rel, r.cls, r.verdict.sha256, r.verdict.phash) for r in good]
    groups = duplicate_groups(items)
    layout, folds = _assign(good, groups, items, spec, published)
    keys = {r.rel: key_name(n) for n, r in enumerate(good)}  # `good` is sorted by path
    splits, rows = {}, []
    for split in _split_names(layout, folds):
        recs = [r for r in good if r.split == split]
        random.Random(f"{spec.seed}:order:{split}").shuffle(recs)  # DALI shuffles in a buffer only
        shards, split_rows = (_write_split(split, recs, labels, keys, tmp,
                                           (source, spec, workers)) if recs else ([], []))
        splits[split] = Split(len(recs), shards)
        rows += split_rows
    write_samples(tmp, rows)
    manifest = Manifest(
        classes=classes, splits=splits, source=str(source.origin), source_files=len(records),
        rejected=[{"path": r.rel, "reason": r.reject} for r in records if r.reject],
        converted=dict(Counter(x for r in good for x in r.verdict.reasons)),
        duplicate_groups=[{"members": [items[i].rel for i in g],
                           "splits": sorted({good[i].split for i in g}),
                           "exact": len({items[i].sha256 for i in g}) == 1} for g in groups],
        options=_shaping_options(spec),
        class_counts={s: dict(Counter(r.cls for r in good if r.split == s)) for s in splits},
        layout=layout, folds=folds,
        split_file=published.summary() if published is not None else None,
        created_by=f"kvasir-shard {__version__}")
    dump(manifest, tmp)
    return manifest, records


def _shaping_options(spec: BuildSpec) -> dict:
    skip = ("src", "out", "workers", "overwrite", "split_file", "allow_missing")
    return {k: v for k, v in asdict(spec).items() if k not in skip}


def build(spec: BuildSpec) -> BuildResult:
    """Run a build; raises BuildError (and other UserErrors) for problems the user can fix."""
    t0 = time.perf_counter()
    spec.check()
    source = open_source(spec.src, spec.max_file_mb)
    workers = spec.workers or os.cpu_count() or 1
    out = Path(spec.out)
    try:
        with staging(out, Path(spec.src), spec.overwrite) as tmp:
            manifest, records = _build_into(tmp, source, spec, workers)
    except OSError as exc:
        raise BuildError(_disk_message(exc, out)) from exc
    return BuildResult(manifest, records, time.perf_counter() - t0, workers)


def _disk_message(exc: OSError, out: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the disk while writing {out}: free space or choose another OUT"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write to {out} ({exc.strerror}): choose a writable OUT folder"
    return f"I/O error while building {out}: {exc}"
