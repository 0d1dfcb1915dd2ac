"""`kvasir-shard`: synth | build | verify | eda | download. Argparse feeding the dataclasses."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from .errors import UserError, run_command


def _build(a: argparse.Namespace) -> int:
    from .build import BuildSpec, build

    spec = BuildSpec(src=a.src, out=a.out, val_fraction=a.val_fraction,
                     test_fraction=a.test_fraction, seed=a.seed,
                     shard_bytes=int(a.shard_mb * 2**20), max_side=a.max_side, name=a.name,
                     folds=a.folds, split_file=a.split_file or "", allow_missing=a.allow_missing,
                     max_file_mb=a.max_file_mb, workers=a.workers, overwrite=a.overwrite)
    res = build(spec)
    m = res.manifest
    per_split = ", ".join(f"{k} {v.count}" for k, v in m.splits.items())
    print(f"packed {res.packed} of {m.source_files} files into {a.out} ({per_split}), "
          f"{len(m.classes)} classes")
    for reason, n in sorted(m.converted.items()):
        print(f"  converted {n}: {reason}")
    for reason, n in Counter(r["reason"] for r in m.rejected).most_common():
        print(f"  rejected {n}: {reason}")
    for r in m.rejected[:20]:
        print(f"    {r['path']}: {r['reason']}")
    if m.duplicate_groups:
        across = sum(len(g["splits"]) > 1 for g in m.duplicate_groups)
        print(f"  {len(m.duplicate_groups)} duplicate groups"
              + (f", {across} of them across splits (as the split file says)" if across
                 else " kept within one split each"))
    src_bytes = sum(r.size for r in res.records)
    print(f"  {len(res.records) / res.elapsed_s:.0f} images/s, "
          f"{src_bytes / res.elapsed_s / 1e6:.1f} MB/s on {res.workers} workers "
          f"({res.elapsed_s:.1f} s)")
    return 0


def _synth(a: argparse.Namespace) -> int:
    from .synth import synth

    if a.per_class < 1:
        raise UserError(f"--per-class {a.per_class}: give at least 1")
    stats = synth(a.out, a.per_class, a.seed, a.workers)
    print(f"wrote {stats['images']} images ({stats['bytes'] / 1e6:.1f} MB) to {a.out}")
    return 0


def _verify(a: argparse.Namespace) -> int:
    from .verify import verify

    errors = verify(a.out)
    for e in errors:
        print(f"kvasir-shard verify: {e}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s) found; rebuild with `kvasir-shard build ... --overwrite`",
              file=sys.stderr)
        return 1
    print(f"{a.out}: all shards match the manifest")
    return 0


def _eda(a: argparse.Namespace) -> int:
    from .eda import eda

    e = eda(a.src, a.out, a.workers, a.max_file_mb)
    print(f"{e['images']} images in {len(e['classes'])} classes, "
          f"{len(e['resolutions'])} resolutions, {len(e['would_reject'])} would be rejected")
    print(f"  mean {e['mean']}, std {e['std']} (RGB, [0, 1])")
    print(f"wrote eda.json, eda.md, grid.png, resolutions.png, colours.png to {a.out}")
    return 0


def _download(a: argparse.Namespace) -> int:
    from .download import download

    z = download(Path(a.dir), a.url, a.sha256, extract=not a.no_extract, timeout=a.timeout)
    print(f"{z}: ok. Next: kvasir-shard build {z} shards/")
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line; each subcommand's help says what it writes."""
    from .build import BuildSpec
    from .download import KVASIR_URL

    d = BuildSpec("", "")
    p = argparse.ArgumentParser(prog="kvasir-shard", description=__doc__,
                                epilog="--debug (or KVASIR_DEBUG=1) shows tracebacks of errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write a synthetic Kvasir-shaped data set")
    s.add_argument("out")
    s.add_argument("--per-class", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    s.set_defaults(fn=_synth)

    b = sub.add_parser("build", help="pack SRC (folder or zip) into split, indexed tar shards")
    b.add_argument("src")
    b.add_argument("out")
    b.add_argument("--val-fraction", type=float, default=d.val_fraction)
    b.add_argument("--test-fraction", type=float, default=d.test_fraction)
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--shard-mb", type=float, default=d.shard_bytes / 2**20,
                   help="target shard size in MiB")
    b.add_argument("--max-side", type=int, default=0,
                   help="downscale images whose longer side exceeds this (0: off)")
    b.add_argument("--name", default=d.name, help="shard file name prefix (letters, digits, - _)")
    b.add_argument("--folds", type=int, default=0,
                   help="deal the non-test samples into K stratified folds (train on K-1, "
                        "validate on one: --data.fold) instead of train/val")
    b.add_argument("--split-file", default=None,
                   help="reuse a published split: a previous samples.csv, or a CSV of "
                        "path,split or path,fold")
    b.add_argument("--allow-missing", action="store_true",
                   help="with --split-file: pack only the files it names, listing the rest")
    b.add_argument("--max-file-mb", type=float, default=d.max_file_mb,
                   help="reject larger files unread (bounds memory on hostile input)")
    b.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    b.set_defaults(fn=_build)

    v = sub.add_parser("verify", help="re-read every shard and check it against the manifest")
    v.add_argument("out")
    v.set_defaults(fn=_verify)

    e = sub.add_parser("eda", help="statistics and pictures of SRC (folder or zip) before packing")
    e.add_argument("src")
    e.add_argument("--out", required=True, help="folder for eda.json, eda.md and the PNGs")
    e.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    e.add_argument("--max-file-mb", type=float, default=d.max_file_mb,
                   help="reject larger files unread")
    e.set_defaults(fn=_eda)

    dl = sub.add_parser("download", help="download and unpack the Kvasir v2 zip")
    dl.add_argument("dir", nargs="?", default="data")
    dl.add_argument("--url", default=KVASIR_URL)
    dl.add_argument("--sha256", default=None, help="expected SHA-256 of the zip")
    dl.add_argument("--no-extract", action="store_true", help="keep the zip only")
    dl.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    dl.set_defaults(fn=_download)

    return p


def _run(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    return a.fn(a)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kvasir-shard`: exit 0 done, 1 verify found problems, 2 user error,
    130/143 stopped by Ctrl-C/SIGTERM."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_command("kvasir-shard", _run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
