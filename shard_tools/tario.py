"""Deterministic WebDataset tars and their DALI index files (format v1.2).

A tar written here depends only on the samples given: USTAR headers, mtime 0, uid/gid 0,
empty owner names, mode 0644. The index lists, per sample, `<ext> <offset> <size> <name>`
for each member, offsets pointing at the member's data (multiple of 512), which is what
DALI's `readers.webdataset` and its own `wds2idx` tool produce.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Member:
    """One member of the index: where a sample component's bytes lie in the tar."""

    ext: str
    offset: int  # bytes from the start of the tar; multiple of 512
    size: int  # bytes
    name: str


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the text before the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def _info(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


class _HashingFile:
    """A write-only file that hashes what passes through (no second read for the digest)."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "wb")  # noqa: SIM115 - closed by TarWriter.close
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.size


class TarWriter:
    """One tar written sample by sample: memory holds one sample, not the shard."""

    def __init__(self, path: Path) -> None:
        self.file = _HashingFile(path)
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.index: list[list[Member]] = []

    def add(self, key: str, parts: dict[str, bytes]) -> None:
        """A sample's members, adjacent, extensions in sorted order (never dict order)."""
        if "." in key or " " in key or not key.isascii():
            raise ValueError(f"sample key {key!r} must be ASCII without dots or spaces")
        row = []
        for ext in sorted(parts):
            name = f"{key}.{ext}"
            info = _info(name, len(parts[ext]))
            self.tar.addfile(info, io.BytesIO(parts[ext]))
            # After addfile, tar.offset is the end of this member's data, padded to 512.
            data_offset = self.tar.offset - -(-info.size // 512) * 512
            row.append(Member(ext, data_offset, info.size, name))
        self.index.append(row)

    def close(self) -> tuple[list[list[Member]], str, int]:
        """(index, SHA-256 hex, size in bytes) of the finished tar."""
        self.tar.close()
        self.file.fh.close()
        return self.index, self.file.sha.hexdigest(), self.file.size


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> list[list[Member]]:
    """Write `(key, {ext: bytes})` samples, members of a sample adjacent; return the index."""
    writer = TarWriter(path)
    for key, parts in samples:
        writer.add(key, parts)
    return writer.close()[0]


def format_index(index: list[list[Member]]) -> str:
    """The text of a v1.2 index file."""
    return "\n".join([f"{INDEX_VERSION} {len(index)}", *map(format_row, index)]) + "\n"


def format_row(row: list[Member]) -> str:
    """One sample's line of the index: `<ext> <offset> <size> <name>` per member."""
    return " ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in row)


def parse_index(text: str, source: str = "index") -> list[list[Member]]:
    """Parse a v1.1/v1.2 index; raise ValueError naming `source` when malformed."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ValueError(f"{source}: first line must be '{INDEX_VERSION} <count>', got {head}")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        f = line.split()
        if not f or len(f) % 4:
            raise ValueError(f"{source}: line {n} does not hold <ext offset size name> groups")
        rows.append([Member(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3])
                     for i in range(0, len(f), 4)])
    if len(rows) != int(head[1]):
        raise ValueError(f"{source}: header says {head[1]} samples, found {len(rows)}")
    return rows


def iter_tar(path: Path) -> Iterator[list[Member]]:
    """The tar's samples in order, read from its headers (independent of how it was written),
    one at a time: tarfile's own list of every member is emptied as it goes."""
    row: list[Member] = []
    last = None  # the key of `row`
    with tarfile.open(path, mode="r:") as tar:
        while (ti := tar.next()) is not None:
            tar.members.clear()  # kept only for getmembers(), which is not used here
            if not ti.isreg():
                continue
            key, ext = split_name(ti.name)
            if row and key != last:
                yield row
                row = []
            row.append(Member(ext, ti.offset_data, ti.size, ti.name))
            last = key
    if row:
        yield row


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file read in `chunk`-byte pieces (8 MiB): memory stays flat whatever the
    shard size."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
