"""`kvasir-shard verify`: re-read every shard and compare it with the manifest.

Checks, per shard: the file exists, its SHA-256 and size match the manifest, its index file
matches the tar's own headers (offsets, sizes, names), every sample has its components, the two
label encodings agree, and the counts add up per shard, per split and against samples.csv.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from .manifest import Manifest, ManifestError, Shard, iter_samples, load, unpack_label
from .tario import INDEX_VERSION, Member, file_sha256, format_row, iter_tar


def _read(fh: BinaryIO, m: Member, limit: int | None = None) -> bytes:
    """Member `m`'s bytes, or its first `limit` (of an image, its magic number). Sizes are
    the tar's own, checked by SHA-256 before: a label is a few bytes."""
    fh.seek(m.offset)
    return fh.read(m.size if limit is None else min(m.size, limit))


def _check_sample(tar: Path, fh: BinaryIO, row: list, manifest: Manifest) -> list[str]:
    comp, errors = manifest.components, []
    parts = {m.ext: m for m in row}
    key = row[0].name.split(".")[0]
    if set(parts) != set(comp.all()):
        return [f"{tar}: sample {key} has components {sorted(parts)}, "
                f"expected {sorted(comp.all())}"]
    text, lbl = _read(fh, parts[comp.label_text]), _read(fh, parts[comp.label])
    try:
        label, number = unpack_label(lbl)
    except ValueError:
        label, number = -1, -1
    if not text.isdigit() or int(text) != label or not 0 <= label < len(manifest.classes):
        errors.append(f"{tar}: sample {key} has labels {comp.label_text}={text!r} "
                      f"{comp.label}={label}")
    if number != int(key):
        errors.append(f"{tar}: sample {key} carries key number {number} in its .lbl")
    if _read(fh, parts[comp.image], 2) != b"\xff\xd8":
        errors.append(f"{tar}: sample {key} image does not start like a JPEG")
    return errors


def _check_shard(root: Path, shard: Shard, manifest: Manifest) -> list[str]:
    tar, idx = root / shard.tar, root / shard.idx
    for p in (tar, idx):
        if not p.is_file():
            return [f"{p}: missing (listed in the manifest)"]
    if file_sha256(tar) != shard.sha256:
        return [f"{tar}: SHA-256 differs from the manifest: the shard was modified or damaged"]
    errors, count, same = [], 0, True
    try:
        with open(idx, encoding="utf-8", errors="replace") as lines, open(tar, "rb") as fh:
            head = lines.readline().rstrip("\n")
            for row in iter_tar(tar):  # one sample at a time: memory flat in the shard's size
                count += 1
                same = same and lines.readline().rstrip("\n") == format_row(row)
                errors += _check_sample(tar, fh, row, manifest)
            same = same and head == f"{INDEX_VERSION} {count}" and not lines.readline()
    except tarfile.TarError as exc:
        return [f"{tar}: {exc}"]
    if count != shard.count:
        errors.insert(0, f"{tar}: {count} samples, manifest says {shard.count}")
    if not same:
        errors.insert(0, f"{idx}: does not match the members of {tar.name} (offsets, sizes, "
                         "names or count)")
    return errors


def _check_counts(root: Path, manifest: Manifest) -> list[str]:
    mpath, errors = root / "manifest.json", []
    for name, split in manifest.splits.items():
        total = sum(s.count for s in split.shards)
        if total != split.count:
            errors.append(f"{mpath}: split {name} counts {split.count}, its shards {total}")
    packed = sum(s.count for s in manifest.splits.values())
    if packed + len(manifest.rejected) != manifest.source_files:
        errors.append(f"{mpath}: {packed} packed + {len(manifest.rejected)} rejected != "
                      f"{manifest.source_files} source files")
    rows = sum(1 for _ in iter_samples(root))  # one row at a time: flat in N
    if rows != packed:
        errors.append(f"{root / 'samples.csv'}: {rows} rows, the shards hold {packed}")
    return errors


def verify(out: str | Path) -> list[str]:
    """All problems found in the shards folder `out` (empty when it is sound); raises
    ManifestError when there is no readable manifest of this format at all."""
    root = Path(out)
    manifest = load(root)
    try:
        errors = _check_counts(root, manifest)
    except ManifestError as exc:
        errors = [str(exc)]
    shards = [s for split in manifest.splits.values() for s in split.shards]
    for shard in tqdm(shards, desc="verify", unit="shard", leave=False):
        errors += _check_shard(root, shard, manifest)
    return errors
