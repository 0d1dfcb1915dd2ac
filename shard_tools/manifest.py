"""The shard contract: what `kvasir-shard build` writes and every reader reads.

A shards folder holds
    manifest.json             `Manifest`: classes, splits and their shards, how it was built
    samples.csv               one `Sample` row per packed image (the published split)
    <split>/<name>-NNNNNN.tar USTAR tars; a sample is the adjacent members `<key>.<ext>`, one per
    <split>/<name>-NNNNNN.idx component (`Components`), plus its DALI index (v1.2)
Keys are `KEY_DIGITS` decimal digits (no dots, no spaces: DALI takes the text after the first dot
as the extension). The label member holds `LABEL_STRUCT`: the class index and the key number as
two little-endian int64, so DALI reads both as one INT64 tensor of shape (2,).

Layouts: "holdout" has the splits train, val and test; "folds" has fold0..fold{K-1} and test,
and training on fold i validates on fold i and trains on the others (`roles`).
Standard library only; a manifest of another `FORMAT_VERSION` is refused with a message.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import UserError

FORMAT = "kvasir-dali-shards"
# 2: the manifest gained `layout`, `folds` and `split_file`; samples.csv gained `fold`.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SAMPLES = "samples.csv"
KEY_DIGITS = 6
LABEL_STRUCT = struct.Struct("<qq")  # (class index, key number), 16 bytes
LABEL_INDEX, KEY_INDEX = 0, 1  # their positions in the decoded (2,) label tensor


class ManifestError(UserError):
    """A shards folder that is missing, unreadable or of another format."""


def key_name(number: int) -> str:
    """The sample key of key number `number`: '000042'."""
    return f"{number:0{KEY_DIGITS}d}"


def pack_label(label: int, key: str) -> bytes:
    """The bytes of a sample's label member."""
    return LABEL_STRUCT.pack(label, int(key))


def unpack_label(data: bytes) -> tuple[int, int]:
    """(class index, key number) from a label member; ValueError when it is not 16 bytes."""
    if len(data) != LABEL_STRUCT.size:
        raise ValueError(f"label member of {len(data)} bytes, expected {LABEL_STRUCT.size}")
    return LABEL_STRUCT.unpack(data)


@dataclass(frozen=True)
class Components:
    """Member extensions of a sample: the image, the binary label, the label as text."""

    image: str = "jpg"
    label: str = "lbl"
    label_text: str = "cls"

    def all(self) -> tuple[str, ...]:
        return (self.image, self.label, self.label_text)


@dataclass(frozen=True)
class Shard:
    """One tar and its index, paths relative to the shards folder."""

    tar: str
    idx: str
    count: int  # samples
    bytes: int  # size of the tar
    sha256: str  # of the tar


@dataclass(frozen=True)
class Split:
    count: int
    shards: list[Shard]


@dataclass
class Manifest:
    """manifest.json as typed data. `splits` maps split names to their shards."""

    classes: list[str]
    splits: dict[str, Split]
    source: str  # the folder or zip packed
    source_files: int  # every file found there: packed + rejected
    rejected: list[dict]  # {"path", "reason"}
    converted: dict[str, int]  # reason -> files re-encoded for it
    duplicate_groups: list[dict]  # {"members", "splits", "exact"}
    options: dict  # the build options that shape the output
    class_counts: dict[str, dict[str, int]]  # split -> class -> samples
    layout: str = "holdout"  # "holdout" | "folds"
    folds: int = 0  # K for the "folds" layout
    split_file: dict | None = None  # where a published split came from, and what it lacked
    components: Components = field(default_factory=Components)
    created_by: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def roles(self, fold: int | None = None) -> dict[str, list[str]]:
        """Split names that play train, val and test; `fold` picks validation in "folds"."""
        if self.layout == "holdout":
            if fold is not None:
                raise ManifestError("these shards have train/val/test splits, not folds; drop "
                                    "--data.fold (or rebuild with --folds K)")
            return {"train": ["train"], "val": ["val"], "test": ["test"]}
        if fold is None or not 0 <= fold < self.folds:
            raise ManifestError(f"these shards are organised in {self.folds} folds: choose the "
                                f"validation fold with --data.fold 0..{self.folds - 1}")
        names = [f"fold{i}" for i in range(self.folds)]
        return {"train": [n for n in names if n != f"fold{fold}"], "val": [f"fold{fold}"],
                "test": ["test"]}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def _from_dict(d: dict, path: Path) -> Manifest:
    try:
        splits = {name: Split(int(s["count"]), [Shard(**sh) for sh in s["shards"]])
                  for name, s in d["splits"].items()}
        known = {f.name for f in fields(Manifest)}
        rest = {k: v for k, v in d.items() if k in known and k not in ("splits", "components")}
        return Manifest(splits=splits, components=Components(**d.get("components", {})), **rest)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{path}: not a valid kvasir-dali manifest ({type(exc).__name__}: "
                            f"{exc}); rebuild with `kvasir-shard build SRC OUT --overwrite`"
                            ) from exc


def load(root: str | Path) -> Manifest:
    """The manifest of the shards folder `root`; ManifestError with what to do otherwise."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} not found: {root} is not a shards folder. Build one with "
                            f"`kvasir-shard build <image folder or zip> {root}`")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable or not JSON ({exc}); rebuild the shards with "
                            "`kvasir-shard build SRC OUT --overwrite`") from exc
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a kvasir-dali shards manifest (no \"format\": "
                            f"\"{FORMAT}\"); build the folder with `kvasir-shard build`")
    if d.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: shards format version {d.get('format_version')}, this "
                            f"kvasir-dali reads version {FORMAT_VERSION}: rebuild them with "
                            "`kvasir-shard build SRC OUT --overwrite`")
    return _from_dict(d, path)


def dump(manifest: Manifest, root: str | Path) -> None:
    (Path(root) / MANIFEST).write_text(manifest.to_json())


@dataclass(frozen=True)
class Sample:
    """One row of samples.csv: a packed image, where it came from and where it went."""

    key: str
    split: str  # train | val | test (holdout); train | test (folds: see `fold`)
    fold: str  # "" or the fold index, as text
    label: int
    cls: str  # the class name (CSV column "class")
    source: str  # path relative to the source's data root
    width: int  # as found (before any conversion)
    height: int
    sha256: str  # of the source file
    converted: int  # 1 when re-encoded (see reason)
    reason: str
    packed_width: int
    packed_height: int
    packed_bytes: int
    shard: str  # tar path relative to the shards folder


CSV_COLUMNS = [("class" if f.name == "cls" else f.name) for f in fields(Sample)]
_INT_COLUMNS = {f.name for f in fields(Sample) if f.type == "int"}


def write_samples(root: str | Path, rows: list[Sample]) -> None:
    """samples.csv, rows in key order (deterministic bytes)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in sorted(rows, key=lambda r: r.key):
        w.writerow([getattr(r, f.name) for f in fields(Sample)])
    (Path(root) / SAMPLES).write_text(buf.getvalue())


def iter_samples(root: str | Path) -> Iterator[Sample]:
    """The rows of samples.csv one at a time; ManifestError when it is missing or malformed."""
    path = Path(root) / SAMPLES
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != CSV_COLUMNS:
                raise ValueError(f"columns {reader.fieldnames}, expected {CSV_COLUMNS}")
            for row in reader:
                yield Sample(**{("cls" if k == "class" else k): (int(v) if k in _INT_COLUMNS
                                                                 else v)
                                for k, v in row.items()})
    except (OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc}); rebuild the shards with "
                            "`kvasir-shard build SRC OUT --overwrite`") from exc


def samples(root: str | Path) -> list[Sample]:
    """Every row of samples.csv (see iter_samples)."""
    return list(iter_samples(root))


def split_digest(rows: list[Sample], split_names: list[str]) -> str:
    """SHA-256 identifying the exact sample list of a split (keys, source digests, labels in
    key order): runs evaluated on equal digests were tested on the same images."""
    digest = hashlib.sha256()
    for r in sorted((r for r in rows if (f"fold{r.fold}" if r.fold else r.split) in split_names),
                    key=lambda r: r.key):
        digest.update(f"{r.key},{r.sha256},{r.label}\n".encode())
    return digest.hexdigest()
