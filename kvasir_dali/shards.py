"""The shards folder as the training side sees it: read and checked through the manifest only.

`ShardSet.open(root)` loads `manifest.json`; `files(split)` gives the tar and index lists for
DALI after checking each shard's size and index header against the manifest, so a damaged or
mismatched shard is reported by name before any pipeline starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ShardError(ValueError):
    """The shards folder is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class SplitFiles:
    """What a DALI reader needs for one split."""

    tars: list[str]
    indexes: list[str]
    count: int  # samples in the split


@dataclass(frozen=True)
class ShardSet:
    """A shards folder written by `kvasir-shard build`."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path) -> ShardSet:
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise ShardError(f"{path} not found: {root} is not a shards folder. Build one with "
                             f"`kvasir-shard build <kvasir folder or zip> {root}`")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ShardError(f"{path}: not valid JSON ({exc}); rebuild the shards") from exc
        return cls(root, manifest)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def count(self, split: str) -> int:
        return int(self.manifest["splits"].get(split, {}).get("count", 0))

    def files(self, split: str) -> SplitFiles:
        """Tar and index paths of `split`, checked against the manifest."""
        info = self.manifest["splits"].get(split)
        if not info or not info["count"]:
            raise ShardError(f"split '{split}' of {self.root} has no samples; rebuild with a "
                             f"non-zero fraction for it (see `kvasir-shard build --help`)")
        tars, idxs = [], []
        for shard in info["shards"]:
            tar, idx = self.root / shard["tar"], self.root / shard["idx"]
            hint = f"run `kvasir-shard verify {self.root}`"
            if not tar.is_file() or not idx.is_file():
                raise ShardError(f"{tar if not tar.is_file() else idx} is missing; {hint}")
            if "bytes" in shard and tar.stat().st_size != shard["bytes"]:
                raise ShardError(f"{tar} is {tar.stat().st_size} bytes, the manifest says "
                                 f"{shard['bytes']}; {hint}")
            with open(idx) as fh:
                head = fh.readline().split()
            if len(head) != 2 or head[1] != str(shard["count"]):
                raise ShardError(f"{idx} header {head} does not match the manifest's "
                                 f"{shard['count']} samples; {hint}")
            tars.append(str(tar))
            idxs.append(str(idx))
        return SplitFiles(tars, idxs, int(info["count"]))
