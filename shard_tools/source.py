"""Read a Kvasir-layout source: a folder `<root>/<class>/**/<file>` or the zip of one.

`open_source(path)` returns a `Source` whose `files()` lists every regular file with its class
(or `None` when it lies outside any class folder) and whose `read(rel)` returns its bytes.
Paths are POSIX, relative to the data root (the folder that holds the class folders).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Entries that archivers add and that are not part of any data set.
_JUNK_DIRS = {"__MACOSX"}


@dataclass(frozen=True)
class SourceFile:
    """One regular file of the source. `cls` is None when it is not inside a class folder."""

    rel: str
    cls: str | None
    size: int


class Source:
    """Base: a tree of files below a data root."""

    def __init__(self, origin: Path) -> None:
        self.origin = origin

    def files(self) -> list[SourceFile]:
        """Every regular file, sorted by path."""
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        """The bytes of one file, by its path relative to the data root."""
        raise NotImplementedError

    def classes(self) -> list[str]:
        """Class names: the folders directly below the data root, sorted."""
        return sorted({f.cls for f in self.files() if f.cls is not None})


def _class_of(rel: str) -> str | None:
    parts = PurePosixPath(rel).parts
    return parts[0] if len(parts) >= 2 else None


class FolderSource(Source):
    """A folder whose subfolders are the classes (descending through a single wrapper folder)."""

    def __init__(self, origin: Path) -> None:
        super().__init__(origin)
        self.root = _descend_wrappers(origin)
        self._files: list[SourceFile] | None = None

    def files(self) -> list[SourceFile]:
        if self._files is None:
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if d not in _JUNK_DIRS)
                for name in filenames:
                    full = Path(dirpath) / name
                    if not full.is_file():  # sockets, broken links: not data
                        continue
                    rel = full.relative_to(self.root).as_posix()
                    found.append(SourceFile(rel, _class_of(rel), full.stat().st_size))
            self._files = sorted(found, key=lambda f: f.rel)
        return self._files

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


def _descend_wrappers(path: Path) -> Path:
    """Follow `kvasir-dataset-v2/` style wrappers: a folder holding one folder and no files."""
    while True:
        entries = [e for e in path.iterdir() if e.name not in _JUNK_DIRS]
        dirs = [e for e in entries if e.is_dir()]
        if len(entries) == 1 and len(dirs) == 1:
            path = dirs[0]
            continue
        return path


class ZipSource(Source):
    """The zip of such a folder, read in place (no extraction)."""

    def __init__(self, origin: Path) -> None:
        super().__init__(origin)
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1
        names = [i.filename for i in self._zf().infolist() if not i.is_dir()]
        names = [n for n in names if PurePosixPath(n).parts[0] not in _JUNK_DIRS]
        self.prefix = _common_wrapper(names)
        self._files = sorted(
            (
                SourceFile(n[len(self.prefix) :], _class_of(n[len(self.prefix) :]),
                           self._zf().getinfo(n).file_size)
                for n in names
            ),
            key=lambda f: f.rel,
        )

    def _zf(self) -> zipfile.ZipFile:
        # One handle per process: a ZipFile is not safe to share across fork.
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.origin)
            self._pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"] = None
        return state

    def files(self) -> list[SourceFile]:
        return self._files

    def read(self, rel: str) -> bytes:
        return self._zf().read(self.prefix + rel)


def _common_wrapper(names: list[str]) -> str:
    """The longest chain of single wrapper folders shared by every member, as 'a/b/'."""
    prefix = ""
    while True:
        heads = {n[len(prefix) :].split("/", 1)[0] for n in names}
        rests = [n[len(prefix) :] for n in names]
        if len(heads) == 1 and all("/" in r for r in rests):
            prefix += heads.pop() + "/"
            continue
        return prefix


def open_source(path: str | os.PathLike) -> Source:
    """Open a folder or a zip; raise a clear error for anything else."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"source not found: {p}")
    if p.is_dir():
        return FolderSource(p)
    if zipfile.is_zipfile(p):
        return ZipSource(p)
    raise ValueError(f"{p} is neither a folder nor a zip file; give the Kvasir folder or its zip")
