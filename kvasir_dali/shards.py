"""The shards folder as the training side sees it: read and checked through its manifest.

`ShardSet.open(root)` loads the manifest (`shard_tools.manifest`, which refuses another format
version). `files(role, fold)` gives DALI the tars, index files and member extensions of the
splits that play `role` (train, val or test), after `check` has compared every one of those
shards with the manifest: size, SHA-256, and the index's sample count against the manifest's
counts. A damaged, edited or mismatched shard stops the run before the first step, named.

SHA-256 of a Kvasir-sized set (2.3 GB) costs about 1.4 s per core; the result is cached per
user (`$KVASIR_CACHE_DIR` or `~/.cache/kvasir-dali/shard-checks.json`), keyed by the file's
device, inode, size, modification and status-change times (ns) and the expected digest. Any
write to a shard changes its ctime, which no user can set back, so a cached "good" never
outlives a modification. `KVASIR_SHARD_CHECK=off` skips the check (not recommended).
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shard_tools.manifest import Components, Manifest, ManifestError, Shard, Split, load
from shard_tools.tario import file_sha256


class ShardError(ManifestError):
    """The shards folder is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class SplitFiles:
    """What a DALI reader needs for one role (train, val or test)."""

    tars: list[str]
    indexes: list[str]
    count: int  # samples
    components: Components


def _cache_path() -> Path:
    base = os.environ.get("KVASIR_CACHE_DIR") or Path.home() / ".cache" / "kvasir-dali"
    return Path(base) / "shard-checks.json"


def _fingerprint(path: Path, expected: str) -> str:
    st = path.stat()
    return f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|" \
           f"{st.st_mtime_ns}|{st.st_ctime_ns}|{expected}"


# Fingerprints this process has hashed: a second check of the same shards (kvasir-train checks
# before the Trainer starts, then in setup()) is free even where the cache file cannot be kept.
_CHECKED: set[str] = set()


def _load_cache() -> set[str]:
    try:
        return set(json.loads(_cache_path().read_text())) | _CHECKED
    except (OSError, ValueError, TypeError):
        return set(_CHECKED)


def _save_cache(good: set[str]) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as fh:
            json.dump(sorted(good)[-100_000:], fh)  # bounded: the newest runs' shards
        os.replace(fh.name, path)
    except OSError:
        pass  # a read-only home: the check still ran, it just is not remembered


@dataclass(frozen=True)
class ShardSet:
    """A shards folder written by `kvasir-shard build`."""

    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: str | Path) -> ShardSet:
        return cls(Path(root), load(root))

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    def _shards(self, role: str, fold: int | None) -> list[Shard]:
        names = self.manifest.roles(fold)[role]
        return [s for n in names for s in self.manifest.splits.get(n, _EMPTY).shards]

    def count(self, role: str, fold: int | None = None) -> int:
        return sum(s.count for s in self._shards(role, fold))

    def _problem(self, shard: Shard) -> str:
        """What is wrong with one shard apart from its digest, or ''."""
        tar, idx = self.root / shard.tar, self.root / shard.idx
        if not tar.is_file() or not idx.is_file():
            return f"{tar if not tar.is_file() else idx} is missing"
        if tar.stat().st_size != shard.bytes:
            return f"{tar} is {tar.stat().st_size} bytes, the manifest says {shard.bytes}"
        with open(idx) as fh:
            head, rows = fh.readline().split(), sum(1 for line in fh if line.strip())
        if head != ["v1.2", str(shard.count)] or rows != shard.count:
            return (f"{idx} lists {rows} samples (header {head}), the manifest says "
                    f"{shard.count}")
        return ""

    def check(self, shards: list[Shard], threads: int = 4) -> None:
        """ShardError naming the first shard that differs from the manifest."""
        hint = f"run `kvasir-shard verify {self.root}` and rebuild the shards"
        for shard in shards:
            if problem := self._problem(shard):
                raise ShardError(f"{problem}; {hint}")
        if os.environ.get("KVASIR_SHARD_CHECK", "").lower() == "off":
            return
        cache = _load_cache()
        todo = [(s, _fingerprint(self.root / s.tar, s.sha256)) for s in shards]
        todo = [(s, fp) for s, fp in todo if fp not in cache]
        with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL
            digests = list(pool.map(lambda t: file_sha256(self.root / t[0].tar), todo))
        for (shard, fp), digest in zip(todo, digests):
            if digest != shard.sha256:
                raise ShardError(f"{self.root / shard.tar}: SHA-256 differs from the manifest "
                                 f"(modified or damaged); {hint}")
            cache.add(fp)
            _CHECKED.add(fp)
        if todo:
            _save_cache(cache)

    def files(self, role: str, fold: int | None = None, threads: int = 4) -> SplitFiles:
        """Tar and index paths of `role`, after checking them against the manifest."""
        shards = self._shards(role, fold)
        names = self.manifest.roles(fold)[role]
        declared = sum(self.manifest.splits.get(n, _EMPTY).count for n in names)
        if not shards or not declared:
            raise ShardError(f"{role} split ({', '.join(names)}) of {self.root} has no samples; "
                             "rebuild with a non-zero fraction for it (see `kvasir-shard build "
                             "--help`)")
        if declared != sum(s.count for s in shards):
            raise ShardError(f"{self.root / 'manifest.json'}: the {role} split counts "
                             f"{declared} samples, its shards {sum(s.count for s in shards)}; "
                             f"run `kvasir-shard verify {self.root}`")
        self.check(shards, threads)
        return SplitFiles([str(self.root / s.tar) for s in shards],
                          [str(self.root / s.idx) for s in shards], declared,
                          self.manifest.components)


_EMPTY = Split(0, [])
