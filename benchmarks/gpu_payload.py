"""The payload for an offline GPU image: what it lacks, as one split, checksummed archive.

    python benchmarks/gpu_payload.py [--python 3.12] [--out .gpu_payload] [--with-nvcomp]
    python benchmarks/gpu_payload.py --check DIR        # parts complete? (sizes and SHA-256)
    python benchmarks/gpu_payload.py --install DIR      # check, then unpack into this Python

The GPU image has torch (CUDA 13), torchvision, Lightning, timm, numpy, opencv... but not DALI,
nvImageCodec, nvJPEG or jsonargparse, and no network. Files reach it only as uploads of at most
64 MiB. So this script, on a machine with a package index, downloads pinned wheels for CPython
3.12 on manylinux x86-64 (`pip download --no-deps`, so the resolver never pulls numpy or torch),
unpacks them into one tree laid out like site-packages (`*.dist-info` included, so pip and
importlib.metadata know them), trims what the GPU never needs, packs it as one `tar.xz`
(`xz -9 -T0`) split into parts of at most 60 MiB, and writes `SHA256SUMS` and `manifest.json`:

    .gpu_payload/cp312/payload.tar.xz.part-00, -01, ...   SHA256SUMS   manifest.json

`--install` (stdlib only: it runs under the GPU image's python3) verifies the parts, then
unpacks them into `sysconfig.get_paths()["purelib"]`, skipping any distribution the interpreter
already has (the image's copy wins; no second `*.dist-info` beside it). Downloaded wheels are
kept in .gpu_payload/wheels/<tag>/ and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".gpu_payload"
ARCHIVE = "payload.tar.xz"
PART_BYTES = 60 * 2**20  # an upload carries at most 64 MiB: a part plus the two small files
MTIME = 1_767_225_600  # 2026-01-01: fixed member times, so the same wheels give the same tar
# DALI 2.4.0 is manylinux_2_28; libcst and optree _2_27/_2_28; nvJPEG and nvtx 2014/_2_17.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux2014_x86_64",
             "manylinux_2_17_x86_64")

# Pinned: what `pip install --dry-run nvidia-dali-cuda130==2.4.0 jsonargparse[signatures]`
# resolves to, minus numpy (the image has it) and the build-only `wheel`.
PACKAGES: dict[str, str] = {
    "nvidia-dali-cuda130": "2.4.0",
    # DALI's decoders go through nvImageCodec; its nvJPEG extension finds libnvjpeg.so.13 in
    # site-packages/nvidia/cu13/lib (RUNPATH), where the image's CUDA 13 wheels live. Of the
    # [all] extra only nvJPEG is taken: the shards hold JPEGs only (no nvjpeg2k, nvtiff).
    "nvidia-nvimgcodec-cu13": "0.9.0.20",
    "nvidia-nvjpeg": "13.3.2.43",  # built with CUDA 13.4, like DALI 2.4.0 itself
    # Imported by nvidia.dali (conditionals/autograph, pytrees, ranges, signatures).
    "astunparse": "1.6.3",
    "gast": "0.7.0",
    "optree": "0.20.0",
    "nvtx": "0.2.17",
    "makefun": "1.16.0",
    "libcst": "1.9.0",
    # kvasir-train is a LightningCLI: jsonargparse with its [signatures] extra.
    "jsonargparse": "4.53.0",
    "docstring-parser": "0.18.0",
    "typeshed-client": "2.15.0",
    # Small dependencies of the above that torch, Lightning and matplotlib already bring into
    # the image; --install skips whatever the image has, so they only fill a gap.
    "six": "1.17.0",
    "packaging": "26.3",
    "typing-extensions": "4.16.0",
    "pyyaml": "6.0.4",
    # benchmarks/throughput.py measures CPU time and RSS with it; skipped if the image has it.
    "psutil": "7.2.2",
}
# DALI loads libnvcomp lazily, only for fn.experimental.inflate (LZ4), which this project never
# uses: 28 MB of wheel left out unless asked for.
NVCOMP = {"nvidia-libnvcomp-cu13": "5.3.0.16"}
# Files the target interpreter must find after trimming (the trim rules must not eat them).
MUST_HAVE = ("nvidia/dali/backend_impl.{tag}-x86_64-linux-gnu.so",
             "nvidia/nvimgcodec/nvimgcodec_impl.{tag}-x86_64-linux-gnu.so",
             "nvidia/nvimgcodec/extensions/libnvjpeg_ext.so.0.9.0",
             "nvidia/cu13/lib/libnvjpeg.so.13", "jsonargparse/__init__.py")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- download ---------------------------------------------------------------------------------
def download(packages: dict[str, str], python: str, wheels: Path) -> list[Path]:
    """One wheel per package into `wheels` (reused when already there); their paths."""
    wheels.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--abi", abi,
           "--progress-bar", "off", "-d", str(wheels)]
    cmd += [a for p in PLATFORMS for a in ("--platform", p)]
    cmd += [f"{name}=={version}" for name, version in packages.items()]
    log(f"pip download {len(packages)} wheels for CPython {python} into {wheels}")
    pip = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in pip.stdout:  # shown as they come; pip's "Location ... is ignored" is noise
        tail = [*tail[-20:], line]
        if line.lstrip().startswith(("Collecting", "Downloading", "Saved", "File was already")):
            print("  " + line.strip(), flush=True)
    if pip.wait():
        sys.exit("pip download failed:\n" + "".join(tail))
    return [find_wheel(wheels, name, version) for name, version in packages.items()]


def find_wheel(wheels: Path, name: str, version: str) -> Path:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = [w for w in wheels.glob("*.whl")
             if w.name.lower().startswith(f"{stem}-{version}-")]
    if len(found) != 1:
        sys.exit(f"expected one wheel of {name}=={version} in {wheels}, found {found}")
    return found[0]


# -- unpack and trim --------------------------------------------------------------------------
@dataclass
class Tree:
    """The site-packages-like tree being built, and which distribution owns each file."""

    root: Path
    owner: dict[str, set[str]] = field(default_factory=dict)  # relative path -> distributions
    dists: dict[str, dict] = field(default_factory=dict)  # name -> version, wheel, sizes


def wheel_target(name: str) -> str | None:
    """Where a wheel member lands in site-packages; None for what a plain install would not
    put there (console scripts, headers and data of `<dist>.data/`)."""
    parts = name.split("/")
    if ".." in parts or name.startswith("/"):
        sys.exit(f"unsafe member name in wheel: {name}")
    if parts[0].endswith(".data") and len(parts) > 2:
        return "/".join(parts[2:]) if parts[1] in ("purelib", "platlib") else None
    return name


def unpack_wheel(wheel: Path, name: str, version: str, tree: Tree) -> None:
    """A wheel is a zip whose files go straight into site-packages; modes kept."""
    files = 0
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            target = None if info.is_dir() else wheel_target(info.filename)
            if target is None:
                continue
            dest = tree.root / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            dest.chmod((info.external_attr >> 16) & 0o777 or 0o644)
            tree.owner.setdefault(target, set()).add(name)
            files += 1
    tree.dists[name] = {"version": version, "wheel": wheel.name,
                        "wheel_bytes": wheel.stat().st_size, "files": files}
    log(f"  unpacked {wheel.name} ({mib(wheel.stat().st_size)}, {files} files)")


def trim_reason(rel: str, tag: str) -> str | None:
    """Why `rel` is left out of the payload, or None to keep it."""
    name = rel.rsplit("/", 1)[-1]
    m = re.search(r"\.(cpython-3\d+t?)-", name)
    if m and m.group(1) != tag:
        return "extension modules for other Python versions"
    parts = rel.split("/")
    if "include" in parts[:-1]:
        return "C/C++ headers (nothing is compiled on the GPU machine)"
    if name.endswith(".a"):
        return "static libraries"
    if "tests" in parts[:-1] and not rel.startswith("typeshed_client/"):
        return "test suites of the packages"
    if re.fullmatch(r"nvidia/nvimgcodec/extensions/lib(nvjpeg2k|nvtiff)_ext\.so.*", rel):
        # Their libraries (nvjpeg2k, nvtiff) are left out: loaded, these would only print
        # "[ERROR] Failed to load nvJPEG2000/nvTIFF library" at every start.
        return "nvImageCodec's JPEG 2000 and TIFF GPU extensions (their libraries are left out)"
    if rel == "nvidia/__init__.py":
        # The image's CUDA 13 wheels leave `nvidia` a namespace package: keep it one, so that
        # nvidia.* in another site directory stays importable.
        return "nvidia/__init__.py (nvidia stays a namespace package)"
    return None


def trim(tree: Tree, tag: str) -> dict[str, dict[str, int]]:
    """Delete what the GPU never needs; per reason, files and bytes removed."""
    removed: dict[str, dict[str, int]] = {}
    for rel in sorted(tree.owner):
        reason = trim_reason(rel, tag)
        if reason is None:
            continue
        path = tree.root / rel
        stat = removed.setdefault(reason, {"files": 0, "bytes": 0})
        stat["files"] += 1
        stat["bytes"] += path.stat().st_size
        path.unlink()
        del tree.owner[rel]
    for d in sorted((p for p in tree.root.rglob("*") if p.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    for reason, s in removed.items():
        log(f"  trimmed {s['files']} files, {mib(s['bytes'])}: {reason}")
    missing = [m.format(tag=tag) for m in MUST_HAVE if m.format(tag=tag) not in tree.owner]
    if missing:
        sys.exit(f"trimming removed files the GPU needs: {missing}")
    return removed


def roots(tree: Tree) -> dict[str, list[str]]:
    """Per distribution, the shortest path prefixes under which every payload file is its own.

    `--install` skips these for a distribution the target interpreter already has. A file two
    distributions ship (nvidia/__init__.py) belongs to no root and is always unpacked.
    """
    owners: dict[str, set[str]] = {}
    for rel, dists in tree.owner.items():
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            owners.setdefault("/".join(parts[:i]), set()).update(dists)
    out: dict[str, set[str]] = {d: set() for d in tree.dists}
    for rel, dists in tree.owner.items():
        parts = rel.split("/")
        prefixes = ("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        root = next((p for p in prefixes if owners[p] == dists and len(dists) == 1), None)
        if root:
            out[next(iter(dists))].add(root)
    return {d: sorted(r) for d, r in out.items()}


# -- pack, split, checksum --------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(tree: Tree, archive: Path, level: int) -> None:
    """tar (sorted, fixed owner and times) piped into `xz -9 -T0`, with progress."""
    files = sorted(tree.owner)
    total = sum((tree.root / f).stat().st_size for f in files)
    log(f"packing {len(files)} files, {mib(total)}, with xz -{level} -T0 (-9: minutes on 2 "
        "cores)")
    with open(archive, "wb") as out:
        xz = subprocess.Popen(["xz", f"-{level}", "-T0", "-c"], stdin=subprocess.PIPE,
                              stdout=out)
        done, shown, t0 = 0, 0.0, time.time()
        with tarfile.open(fileobj=xz.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for rel in files:
                info = tar.gettarinfo(tree.root / rel, arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = MTIME
                with open(tree.root / rel, "rb") as f:
                    tar.addfile(info, f)
                done += info.size
                if done / total - shown >= 0.1:  # xz's pace shows through the pipe
                    shown = done / total
                    log(f"  {100 * shown:.0f}% fed, {time.time() - t0:.0f} s")
        xz.stdin.close()
        if xz.wait():
            sys.exit("xz failed")
    log(f"archive {mib(archive.stat().st_size)} in {time.time() - t0:.0f} s")


def split(archive: Path, part_bytes: int) -> list[dict]:
    """`archive` cut into `<archive>.part-NN` files; name, bytes, sha256 of each."""
    parts = []
    with open(archive, "rb") as f:
        for i in range(1000):
            data = f.read(part_bytes)
            if not data:
                break
            path = archive.with_name(f"{archive.name}.part-{i:02d}")
            path.write_bytes(data)
            parts.append({"name": path.name, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
            log(f"  {path.name}: {mib(len(data))}")
    return parts


def write_sums(out: Path, parts: list[dict], whole: dict) -> None:
    lines = ["# sha256  bytes  name (the last line: all parts joined in order)"]
    lines += [f"{p['sha256']}  {p['bytes']}  {p['name']}" for p in [*parts, whole]]
    (out / "SHA256SUMS").write_text("\n".join(lines) + "\n")


# -- check and install (stdlib only: these run under the GPU image's python3) ------------------
def read_sums(payload: Path) -> tuple[list[dict], dict]:
    sums = payload / "SHA256SUMS"
    if not sums.is_file():
        sys.exit(f"payload check failed: {sums} is missing")
    rows = [line.split() for line in sums.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    entries = [{"sha256": r[0], "bytes": int(r[1]), "name": r[2]} for r in rows]
    return entries[:-1], entries[-1]


def iter_parts(payload: Path, parts: list[dict]) -> Iterator[bytes]:
    for p in parts:
        with open(payload / p["name"], "rb") as f:
            yield from iter(lambda: f.read(1 << 20), b"")


def check(payload: Path) -> list[dict]:
    """Every part present with its size and SHA-256, and the whole; exits naming the bad ones."""
    parts, whole = read_sums(payload)
    bad = []
    for p in parts:
        path = payload / p["name"]
        if not path.is_file():
            bad.append(f"{p['name']}: missing")
        elif path.stat().st_size != p["bytes"]:
            bad.append(f"{p['name']}: {path.stat().st_size} bytes, expected {p['bytes']} "
                       "(incomplete copy?)")
        elif sha256_file(path) != p["sha256"]:
            bad.append(f"{p['name']}: SHA-256 differs (damaged)")
        else:
            print(f"  ok {p['name']} {p['bytes']} bytes", flush=True)
    if bad:
        sys.exit("payload check failed in " + str(payload) + ":\n  " + "\n  ".join(bad))
    h = hashlib.sha256()
    for block in iter_parts(payload, parts):
        h.update(block)
    if h.hexdigest() != whole["sha256"]:
        sys.exit(f"payload check failed: the joined parts do not give {whole['name']}")
    print(f"  ok {whole['name']} ({len(parts)} parts joined, {whole['bytes']} bytes)", flush=True)
    return parts


def present(dists: dict[str, dict]) -> dict[str, str]:
    """Distributions of the payload this interpreter already has: name -> its version."""
    have = {}
    for name in dists:
        try:
            have[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return have


class Joined(io.RawIOBase):
    """The parts read as one file, for Python's own lzma where there is no `xz` binary."""

    def __init__(self, payload: Path, parts: list[dict]) -> None:
        self.blocks, self.rest = iter_parts(payload, parts), b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self.rest:
            self.rest = next(self.blocks, None)
            if self.rest is None:
                return 0
        n = min(len(buf), len(self.rest))
        buf[:n], self.rest = self.rest[:n], self.rest[n:]
        return n


def open_archive(payload: Path, parts: list[dict]) -> tuple[tarfile.TarFile, Callable]:
    """The joined parts as a streamed tar, and a function that says whether decoding failed.

    `xz -dc -T0` decodes the blocks of an `xz -T0` archive in parallel (xz >= 5.4); without
    the binary, Python's lzma does it on one core.
    """
    if not shutil.which("xz"):
        tar = tarfile.open(fileobj=io.BufferedReader(Joined(payload, parts), 1 << 20),
                           mode="r|xz")
        return tar, lambda: 0
    xz = subprocess.Popen(["xz", "-dc", "-T0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def feed() -> None:
        for block in iter_parts(payload, parts):
            xz.stdin.write(block)
        xz.stdin.close()

    threading.Thread(target=feed, daemon=True).start()
    return tarfile.open(fileobj=xz.stdout, mode="r|"), xz.wait


def install(payload: Path, site: Path, force: bool) -> None:
    """Check the parts, then unpack into `site`, keeping the image's own distributions."""
    parts = check(payload)
    manifest = json.loads((payload / "manifest.json").read_text())
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if manifest["python"] != here:
        sys.exit(f"payload install failed: {payload} is built for Python {manifest['python']}, "
                 f"this is {here} (build it with --python {here})")
    have = {} if force else present(manifest["distributions"])
    skip = tuple(r for d in have for r in manifest["distributions"][d]["roots"])
    for name, version in have.items():
        print(f"  kept the image's {name} {version} (payload has "
              f"{manifest['distributions'][name]['version']})", flush=True)
    t0, n, skipped = time.time(), 0, 0
    tar, failed = open_archive(payload, parts)
    with tar:
        for member in tar:
            if any(member.name == r or member.name.startswith(r + "/") for r in skip):
                skipped += 1
                continue
            tar.extract(member, site, filter="data")  # no absolute paths, links or devices
            n += 1
    if failed():
        sys.exit("payload install failed: xz could not decompress the archive")
    print(f"  unpacked {n} files into {site} in {time.time() - t0:.1f} s"
          f" ({skipped} skipped)", flush=True)


# -- build --------------------------------------------------------------------------------------
def manifest(tree: Tree, python: str, removed: dict, archive: dict, parts: list[dict]) -> dict:
    r = roots(tree)
    dists = {name: d | {"roots": r[name]} for name, d in sorted(tree.dists.items())}
    return {"python": python, "abi": "cp" + python.replace(".", ""), "platforms": PLATFORMS,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "distributions": dists,
            "tree": {"files": len(tree.owner),
                     "bytes": sum((tree.root / f).stat().st_size for f in tree.owner)},
            "trimmed": removed, "archive": archive, "parts": parts,
            "install": "python3 benchmarks/gpu_payload.py --install DIR"}


def build(python: str, out_root: Path, with_nvcomp: bool, part_bytes: int, level: int) -> Path:
    tag = "cpython-" + python.replace(".", "")
    abi = "cp" + python.replace(".", "")
    packages = PACKAGES | (NVCOMP if with_nvcomp else {})
    wheels = download(packages, python, out_root / "wheels" / abi)
    out = out_root / abi
    tree = Tree(out_root / f"tree-{abi}")
    shutil.rmtree(tree.root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log(f"unpacking {len(wheels)} wheels into {tree.root}")
    for (name, version), wheel in zip(packages.items(), wheels):
        unpack_wheel(wheel, name, version, tree)
    removed = trim(tree, tag)
    archive = out / ARCHIVE
    pack(tree, archive, level)
    whole = {"name": ARCHIVE, "bytes": archive.stat().st_size, "sha256": sha256_file(archive)}
    parts = split(archive, part_bytes)
    archive.unlink()  # only the parts travel
    write_sums(out, parts, whole)
    man = manifest(tree, python, removed, whole | {"xz_level": level}, parts)
    (out / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")
    shutil.rmtree(tree.root)
    log(f"payload {out}: {len(parts)} parts, {mib(whole['bytes'])} "
        f"({mib(man['tree']['bytes'])} unpacked); check it with "
        "benchmarks/payload_unpack_test.sh")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", metavar="DIR", type=Path, help="verify the parts in DIR")
    mode.add_argument("--install", metavar="DIR", type=Path,
                      help="verify, then unpack into this interpreter's site-packages")
    p.add_argument("--site", type=Path, default=None,
                   help="--install target (default: sysconfig purelib of this interpreter)")
    p.add_argument("--force", action="store_true",
                   help="--install: overwrite distributions this interpreter already has")
    p.add_argument("--python", default="3.12", help="target CPython version (default 3.12)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--with-nvcomp", action="store_true",
                   help="add nvidia-libnvcomp-cu13 (only DALI's fn.experimental.inflate uses it)")
    p.add_argument("--part-mib", type=int, default=PART_BYTES // 2**20)
    p.add_argument("--level", type=int, default=9, choices=range(10),
                   help="xz preset (default 9; a quick local test payload: 1)")
    a = p.parse_args(argv)
    if a.check:
        check(a.check)
    elif a.install:
        install(a.install, a.site or Path(sysconfig.get_paths()["purelib"]), a.force)
    else:
        build(a.python, a.out, a.with_nvcomp, a.part_mib * 2**20, a.level)


if __name__ == "__main__":
    main()
