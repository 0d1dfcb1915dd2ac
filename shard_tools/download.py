"""`kvasir-shard download`: fetch the Kvasir v2 zip, resumable, checked, safely unpacked.

Network access happens here and nowhere else in the project, and only when the user asks.
Without a network it fails within seconds and says how to get the zip by hand.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .errors import UserError
from .tario import file_sha256

KVASIR_URL = "https://datasets.simula.no/downloads/kvasir/kvasir-dataset-v2.zip"
ZIP_NAME = "kvasir-dataset-v2.zip"


class DownloadError(UserError):
    """A download failure with what to do next."""


def _manual_hint(url: str, dest: Path) -> str:
    return (f"download {url} by hand (a browser, or another machine), put it at {dest}, then run "
            f"`kvasir-shard build {dest} shards/` (the zip is read in place, no unpacking needed)")


def fetch(url: str, dest: Path, timeout: float = 10.0) -> Path:
    """Download `url` to `dest`, resuming a `.part` file left by an earlier attempt."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - user-given URL
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the .part is already whole
            part.rename(dest)
            return dest
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; "
                            f"{_manual_hint(url, dest)}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"cannot reach {url} ({getattr(exc, 'reason', exc)}); "
                            f"{_manual_hint(url, dest)}") from exc
    with resp:
        resumed = resp.status == 206
        if not resumed:
            have = 0  # the server ignored Range: start again
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total else None
        with open(part, "ab" if resumed else "wb") as fh, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=dest.name
        ) as bar:
            while chunk := resp.read(1 << 20):
                fh.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise DownloadError(f"{part}: got {part.stat().st_size} of {total} bytes; "
                            "run again to resume")
    part.rename(dest)
    return dest


def check_zip(path: Path, sha256: str | None = None) -> None:
    """Raise DownloadError when the zip is damaged or its checksum differs."""
    if sha256 and (digest := file_sha256(path)) != sha256.lower():
        raise DownloadError(f"{path}: SHA-256 {digest} != expected {sha256}; "
                            "delete it and download again")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{path}: not a valid zip ({exc}); "
                            "delete it and download again") from exc
    if bad:
        raise DownloadError(f"{path}: member {bad} fails its CRC; delete it and download again")


def safe_extract(path: Path, dest: Path) -> None:
    """Unpack, refusing any member that would land outside `dest` (absolute, `..`, links)."""
    dest = dest.resolve()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            target = (dest / info.filename).resolve()
            if name.is_absolute() or ".." in name.parts or not target.is_relative_to(dest):
                raise DownloadError(f"{path}: member {info.filename!r} would escape {dest}; "
                                    "refusing to unpack this zip")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DownloadError(f"{path}: member {info.filename!r} is a symbolic link; "
                                    "refusing")
        for info in tqdm(zf.infolist(), desc="unpack", unit="file", leave=False):
            target = dest / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def download(dest_dir: Path, url: str = KVASIR_URL, sha256: str | None = None,
             extract: bool = True, timeout: float = 10.0) -> Path:
    """Fetch, check and (optionally) unpack; return the zip's path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    zpath = dest_dir / (PurePosixPath(url.split("?")[0]).name or ZIP_NAME)
    if not zpath.exists():
        fetch(url, zpath, timeout)
    check_zip(zpath, sha256)
    if extract:
        safe_extract(zpath, dest_dir)
    return zpath
