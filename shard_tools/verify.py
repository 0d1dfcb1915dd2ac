"""`kvasir-shard verify`: re-read every shard and compare it with the manifest.

Checks, per shard: the file exists, its SHA-256 and size match the manifest, its index file
matches the tar's own headers (offsets, sizes, names), every sample has its image and labels,
the two label encodings agree, and the counts add up per shard and per split.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tarfile
from pathlib import Path

from tqdm import tqdm

from .tario import parse_index, scan_tar

REQUIRED = ("cls", "jpg", "lbl")


def _check_shard(root: Path, entry: dict, n_classes: int) -> list[str]:
    tar, idx = root / entry["tar"], root / entry["idx"]
    for p in (tar, idx):
        if not p.is_file():
            return [f"{p}: missing (listed in the manifest)"]
    data = tar.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return [f"{tar}: SHA-256 differs from the manifest: the shard was modified or damaged"]
    try:
        index = parse_index(idx.read_text(), str(idx))
        actual = scan_tar(tar)
    except (ValueError, tarfile.TarError) as exc:
        return [f"{idx if isinstance(exc, ValueError) else tar}: {exc}"]
    errors = []
    if index != actual:
        errors.append(f"{idx}: does not match the members of {tar.name} (offsets, sizes or names)")
    if len(actual) != entry["count"]:
        errors.append(f"{tar}: {len(actual)} samples, manifest says {entry['count']}")
    for row in actual:
        parts = {m.ext: m for m in row}
        key = row[0].name.split(".")[0]
        if set(parts) != set(REQUIRED):
            errors.append(f"{tar}: sample {key} has components {sorted(parts)}, "
                          f"expected {list(REQUIRED)}")
            continue
        text = data[parts["cls"].offset : parts["cls"].offset + parts["cls"].size]
        lbl = data[parts["lbl"].offset : parts["lbl"].offset + parts["lbl"].size]
        binary, number = struct.unpack("<qq", lbl) if len(lbl) == 16 else (-1, -1)
        if not text.isdigit() or int(text) != binary or not 0 <= binary < n_classes:
            errors.append(f"{tar}: sample {key} has labels cls={text!r} lbl={binary}")
        if number != int(key):
            errors.append(f"{tar}: sample {key} carries key number {number} in its .lbl")
        jpg = data[parts["jpg"].offset : parts["jpg"].offset + 2]
        if jpg != b"\xff\xd8":
            errors.append(f"{tar}: sample {key} image does not start like a JPEG")
    return errors


def verify(out: str | Path) -> list[str]:
    """All problems found in the shards folder `out` (empty when it is sound)."""
    root = Path(out)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        return [f"{mpath}: missing; is {root} a folder written by `kvasir-shard build`?"]
    manifest = json.loads(mpath.read_text())
    n_classes = len(manifest["classes"])
    entries = [(s, e) for s, info in manifest["splits"].items() for e in info["shards"]]
    errors: list[str] = []
    for split, info in manifest["splits"].items():
        total = sum(e["count"] for e in info["shards"])
        if total != info["count"]:
            errors.append(f"{mpath}: split {split} counts {info['count']}, its shards {total}")
    for _, entry in tqdm(entries, desc="verify", unit="shard", leave=False):
        errors += _check_shard(root, entry, n_classes)
    packed = sum(info["count"] for info in manifest["splits"].values())
    if packed + len(manifest["rejected"]) != manifest["source_files"]:
        errors.append(f"{mpath}: {packed} packed + {len(manifest['rejected'])} rejected != "
                      f"{manifest['source_files']} source files")
    return errors
