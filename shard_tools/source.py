"""Read an image source: a folder of class folders, or the zip of one, as users have them.

The class of an image is the name of the folder that holds it, when that folder is a class
folder: a folder holding image files (by suffix) and no deeper folder of images. So wrapper
folders (`kvasir-dataset-v2/<class>/`), nested layouts (HyperKvasir's
`labeled-images/<region>/<kind>/<class>/`) and stray files at any level never change the
classes. Every entry is listed, and one that cannot be packed says why: files outside a class
folder, hidden and system files (`.DS_Store`, `__MACOSX/`), files over the size limit, special
files (FIFOs, sockets), broken symbolic links, and zip members whose names would escape the
archive (`..`, absolute, drive letters, backslashes) or that are links. Two class folders with
the same name in different places stop the build: which one is meant is the user's call.

Symbolic links in a folder are followed, to files and to folders, wherever they point; a link
back to a folder already listed (a loop, or a second way to the same folder) is rejected with
the reason. Links inside a zip are never followed. Reading is bounded: a file larger than
`max_file_bytes` is rejected by its size before it is read, and a read never returns more than
the limit, whatever a zip header declares.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
SYSTEM_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
DEFAULT_MAX_FILE_MB = 64  # a Kvasir frame is at most ~1.5 MB; a 64 MB image is not a frame


class SourceError(UserError):
    """The source cannot be used as given (missing, not a folder or zip, ambiguous classes)."""


class ReadError(Exception):
    """One file could not be read; the message is its rejection reason."""


@dataclass(frozen=True)
class SourceFile:
    """One entry of the source. `cls` is None when it is not packed; `reject` then says why."""

    rel: str  # POSIX path below the data root
    cls: str | None
    size: int  # bytes (as declared, for zip members)
    reject: str = ""


@dataclass(frozen=True)
class _Entry:
    """A listed path before classes are known; `problem` is a rejection reason or ''."""

    rel: str
    size: int
    problem: str = ""


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") or p in SYSTEM_NAMES for p in PurePosixPath(rel).parts)


def _is_image_name(rel: str) -> bool:
    return PurePosixPath(rel).suffix.lower() in IMAGE_SUFFIXES


def _wrapper_prefix(entries: list[_Entry], class_dirs: set[str]) -> str:
    """The chain of folders that every entry lies in ('kvasir-dataset-v2/'), stopping above a
    class folder; archivers' `__MACOSX/` does not count. Stripped from the paths so that a
    folder and its zip give the same relative paths."""
    rels = [e.rel for e in entries if PurePosixPath(e.rel).parts[0] not in SYSTEM_NAMES]
    prefix = ""
    while rels:
        heads = {r[len(prefix):].split("/", 1)[0] for r in rels}
        head = prefix + heads.pop()
        if heads or head in class_dirs or not all(r.startswith(head + "/") for r in rels):
            break
        prefix = head + "/"
    stripped = [e.rel[len(prefix):] if e.rel.startswith(prefix) else e.rel for e in entries]
    return prefix if len(set(stripped)) == len(stripped) else ""


def _class_folders(entries: list[_Entry]) -> dict[str, str]:
    """{folder: class name} for the leaf folders that hold image files."""
    image_dirs = {str(PurePosixPath(e.rel).parent) for e in entries
                  if not e.problem and not _hidden(e.rel) and _is_image_name(e.rel)}
    image_dirs.discard(".")
    ancestors = {str(a) for d in image_dirs for a in PurePosixPath(d).parents}
    leaves = sorted(d for d in image_dirs if d not in ancestors)
    by_name: dict[str, str] = {}
    for d in leaves:
        name = PurePosixPath(d).name
        if name in by_name:
            raise SourceError(f"two different folders are both class '{name}': "
                              f"'{by_name[name]}/' and '{d}/'; give a source with one of them, "
                              "or rename one")
        by_name[name] = d
    return {d: name for name, d in by_name.items()}


def _not_in_class(rel: str, holders: set[str]) -> str:
    parent = str(PurePosixPath(rel).parent)
    if parent == ".":
        return "not inside a class folder (a file at the top level)"
    if parent in holders:
        return f"not inside a class folder ('{parent}/' holds folders of images)"
    return f"not inside a class folder (no image files in '{parent}/')"


def classify(entries: list[_Entry], max_file_bytes: int) -> tuple[list[SourceFile], dict]:
    """Every entry with its class or its rejection reason, sorted by path; and a map from each
    file's (wrapper-stripped) path to its path in the source."""
    classes = _class_folders(entries)
    holders = {str(a) for d in classes for a in PurePosixPath(d).parents}  # above a class
    prefix = _wrapper_prefix(entries, set(classes))
    out, where = [], {}
    for e in entries:
        rel = e.rel[len(prefix):] if e.rel.startswith(prefix) else e.rel
        where[rel] = e.rel
        if e.problem:
            out.append(SourceFile(rel, None, e.size, e.problem))
        elif _hidden(e.rel):
            out.append(SourceFile(rel, None, e.size, "hidden or system file, not data"))
        elif e.size > max_file_bytes:
            out.append(SourceFile(rel, None, e.size, _too_large(e.size, max_file_bytes)))
        elif (cls := classes.get(str(PurePosixPath(e.rel).parent))) is None:
            out.append(SourceFile(rel, None, e.size, _not_in_class(e.rel, holders)))
        else:
            out.append(SourceFile(rel, cls, e.size))
    return sorted(out, key=lambda f: f.rel), where


def _too_large(size: int, limit: int) -> str:
    return (f"file of {size / 2**20:.1f} MiB is over the {limit / 2**20:.0f} MiB limit "
            "(--max-file-mb)")


class Source:
    """A tree of files below a data root; `read` is bounded by `max_file_bytes`."""

    def __init__(self, origin: Path, max_file_bytes: int) -> None:
        self.origin = origin
        self.max_file_bytes = max_file_bytes
        self._files: list[SourceFile] = []

    def files(self) -> list[SourceFile]:
        """Every entry, sorted by path, packed or with its rejection reason."""
        return self._files

    def classes(self) -> list[str]:
        """Class names, sorted."""
        return sorted({f.cls for f in self._files if f.cls is not None})

    def read(self, rel: str) -> bytes:
        """The bytes of one file; ReadError (with the reason) when unreadable or too large."""
        raise NotImplementedError

    def _bounded(self, fh, declared: int) -> bytes:
        if declared > self.max_file_bytes:
            raise ReadError(_too_large(declared, self.max_file_bytes))
        data = fh.read(self.max_file_bytes + 1)
        if len(data) > self.max_file_bytes:
            raise ReadError(_too_large(len(data), self.max_file_bytes) + " (grew while read)")
        return data


class FolderSource(Source):
    """A folder, walked with symbolic links followed (loops rejected)."""

    def __init__(self, origin: Path, max_file_bytes: int) -> None:
        super().__init__(origin, max_file_bytes)
        self._files, self._where = classify(self._walk(), max_file_bytes)

    def _walk(self) -> list[_Entry]:
        entries: list[_Entry] = []
        seen_dirs: dict[str, str] = {}
        todo = [self.origin]
        while todo:
            folder = todo.pop()
            real = os.path.realpath(folder)
            rel_dir = folder.relative_to(self.origin).as_posix()
            if real in seen_dirs:
                entries.append(_Entry(rel_dir, 0, "symbolic link to a folder already listed "
                                                  f"('{seen_dirs[real]}'): not read twice"))
                continue
            seen_dirs[real] = rel_dir
            try:
                children = sorted(os.scandir(folder), key=lambda d: d.name)
            except OSError as exc:
                entries.append(_Entry(rel_dir, 0, f"folder not readable: {exc.strerror}"))
                continue
            for child in children:
                entries += self._visit(Path(child.path), todo)
        return entries

    def _visit(self, path: Path, todo: list[Path]) -> list[_Entry]:
        rel = path.relative_to(self.origin).as_posix()
        try:
            st = path.stat()  # follows links
        except OSError:
            return [_Entry(rel, 0, "broken symbolic link (its target does not exist)")]
        if stat.S_ISDIR(st.st_mode):
            todo.append(path)
            return []
        if not stat.S_ISREG(st.st_mode):
            kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket or device"
            return [_Entry(rel, 0, f"not a regular file (a {kind}): not read")]
        return [_Entry(rel, st.st_size)]

    def read(self, rel: str) -> bytes:
        full = self.origin / self._where[rel]
        try:
            with open(full, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise ReadError("not a regular file")
                return self._bounded(fh, st.st_size)
        except OSError as exc:
            raise ReadError(f"cannot read: {exc.strerror or exc}") from exc


def _unsafe_member(name: str) -> str:
    """Why a zip member name would escape the archive root, or ''."""
    if "\\" in name:
        return "unsafe member name (a backslash): not read"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "unsafe member name (an absolute path or drive letter): not read"
    if ".." in PurePosixPath(name).parts:
        return "unsafe member name ('..' would leave the archive root): not read"
    return ""


def _zip_entry(info: zipfile.ZipInfo, dupes: set[str]) -> _Entry:
    name = info.filename
    problem = _unsafe_member(name)
    if not problem and (info.external_attr >> 16) & 0o170000 == 0o120000:
        problem = "symbolic link inside the zip: not followed"
    if not problem and info.flag_bits & 0x1:
        problem = "encrypted zip member: cannot be read"
    if not problem and name in dupes:
        problem = "the zip holds several members of this name: ambiguous, not read"
    return _Entry(name, info.file_size, problem)


class ZipSource(Source):
    """A zip, read in place (never extracted)."""

    def __init__(self, origin: Path, max_file_bytes: int) -> None:
        super().__init__(origin, max_file_bytes)
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1
        infos = [i for i in self._zf().infolist() if not i.is_dir()]
        dupes = {n for n, k in Counter(i.filename for i in infos).items() if k > 1}
        self._files, where = classify([_zip_entry(i, dupes) for i in infos], max_file_bytes)
        by_name = {i.filename: i for i in infos}
        self._member = {rel: by_name[name] for rel, name in where.items()}

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

    def read(self, rel: str) -> bytes:
        info = self._member[rel]
        try:
            with self._zf().open(info) as fh:
                return self._bounded(fh, info.file_size)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
            raise ReadError(f"zip member cannot be read: {exc}") from exc


def open_source(path: str | os.PathLike, max_file_mb: float = DEFAULT_MAX_FILE_MB) -> Source:
    """Open a folder or a zip; SourceError for anything else."""
    p = Path(path)
    limit = int(max_file_mb * 2**20)
    if not p.exists():
        raise SourceError(f"source not found: {p}; give the image folder or its zip")
    if p.is_dir():
        return FolderSource(p, limit)
    if p.is_file() and zipfile.is_zipfile(p):
        try:
            return ZipSource(p, limit)
        except (zipfile.BadZipFile, OSError) as exc:
            raise SourceError(f"{p}: damaged zip ({exc}); download it again") from exc
    raise SourceError(f"{p} is neither a folder nor a zip file; give the image folder or its zip")
