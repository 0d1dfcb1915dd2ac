"""The output folder of a build, replaced safely: `staging(out, src, overwrite)`.

- OUT is refused when it is the source, lies inside it or holds it, is the current folder (or
  holds it), is a mount point, or is not a folder; `overwrite` replaces only an empty folder or
  an earlier kvasir-shard build whose manifest proves it and that holds nothing else.
- A lock file beside OUT (`.OUT.lock`, flock: the kernel releases it when the process dies;
  removed when the build ends) makes a second build into the same OUT fail at once.
- The build is written into `.OUT.partial-PID` beside OUT, then swapped with OUT in one atomic
  step (renameat2 RENAME_EXCHANGE on Linux; elsewhere two renames, and the next build puts a
  stranded `.OUT.old-PID` back). There is never a moment when a crash leaves no OUT where one
  existed. Leftovers of dead builds are removed by the next build, which says so.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .manifest import FORMAT, MANIFEST, SAMPLES


class OutError(UserError):
    """OUT cannot be written or replaced as asked."""


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _build_files(out: Path) -> set[Path] | None:
    """The files an earlier build wrote into `out` (from its manifest), or None if not a build."""
    import json

    try:
        m = json.loads((out / MANIFEST).read_text())
        if m.get("format") != FORMAT:
            return None
        files = {out / MANIFEST, out / SAMPLES}
        for split in m["splits"].values():
            for shard in split["shards"]:
                files |= {out / shard["tar"], out / shard["idx"]}
        return files
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check(out: Path, src: Path, overwrite: bool) -> None:
    """Refuse an OUT that a build must not write or replace; see the module docstring."""
    o, s = out.resolve(), src.resolve()
    if _inside(o, s) or _inside(s, o):
        raise OutError(f"OUT {out} is the source {src}, lies inside it or holds it: a build "
                       "there could destroy the images; choose a folder outside the source")
    if _inside(Path.cwd().resolve(), o):
        raise OutError(f"OUT {out} is the current folder or holds it; give a new folder, e.g. "
                       "shards/")
    if out.exists() and not out.is_dir():
        raise OutError(f"OUT {out} exists and is not a folder; choose another path")
    if out.is_dir() and os.path.ismount(out):
        raise OutError(f"OUT {out} is a mount point, which cannot be replaced in one step; "
                       f"give a folder inside it, e.g. {out / 'shards'}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise OutError(f"{out} exists and is not empty; pass --overwrite to replace an earlier "
                       "build there, or choose another OUT")
    known = _build_files(out)
    if known is None:
        raise OutError(f"{out} is not an earlier kvasir-shard build (no valid {MANIFEST}); "
                       "--overwrite replaces only those: choose another OUT")
    extra = sorted(p for p in out.rglob("*") if p.is_file() and p not in known)
    if extra:
        raise OutError(f"{out} holds {len(extra)} file(s) a build did not write (e.g. "
                       f"{extra[0]}); move them away or choose another OUT")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _clean_leftovers(out: Path) -> None:
    """Remove what dead builds left beside OUT; put back an OUT stranded mid-swap."""
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            old.rename(out)
            print(f"kvasir-shard: restored {out} from an interrupted replacement", file=sys.stderr)
            continue
        shutil.rmtree(old, ignore_errors=True)
    for part in sorted(out.parent.glob(f".{out.name}.partial-*")):
        shutil.rmtree(part, ignore_errors=True)
        print(f"kvasir-shard: removed {part}, left by a build that did not finish",
              file=sys.stderr)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `.OUT.lock` for the block; removed at the end, so nothing is left beside OUT."""
    lock = out.parent / f".{out.name}.lock"
    fh = open(lock, "a")  # noqa: SIM115 - held for the whole build
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder before us may have removed the file after we opened it: then our lock
            # is on a dead inode and a third build could lock the new file. Same inode or fail.
            if os.fstat(fh.fileno()).st_ino != os.stat(lock).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise OutError(f"another kvasir-shard build is writing {out} right now (it holds "
                           f"{lock}); wait for it to finish or stop it") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        fh.close()


def _commit(tmp: Path, out: Path) -> None:
    if out.exists() and _exchange(tmp, out):
        shutil.rmtree(tmp)  # now the previous build
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging(out: Path, src: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh folder to build into; moved into place as OUT when the block ends normally,
    removed when it raises (any exception, Ctrl-C or SIGTERM)."""
    check(out, src, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _clean_leftovers(out)
        check(out, src, overwrite)  # again, under the lock: OUT may have changed meanwhile
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
            _commit(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
