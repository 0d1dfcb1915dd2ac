"""`kvasir-predict CKPT INPUT... --out predictions.csv`: classify images with a trained model.

INPUT is any mix of image files, folders (searched recursively for image files) and shards
folders (one split, `--split`); see `predictor.py` for what happens to each. Output columns:
path, pred (class index), pred_class, p_<class> for every class, top3 (class names, best first,
';'-separated), error (empty when predicted). `--cam DIR` also writes, per image, the picture
with a class-activation heatmap of the predicted class, and `DIR/cams.png`.

Exit status: 0 every input predicted; 1 some inputs failed (their rows say why); 2 nothing
predicted, or a usage error (bad option, unreadable checkpoint, unwritable --out); 130/143
stopped by Ctrl-C/SIGTERM, after writing the CSV with what was predicted (the rest's rows say
"not predicted").
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from shard_tools.errors import Terminated, UserError, run_command

from .predictor import Options, Predictor, Row, gather


def writable(path: Path) -> None:
    """UserError unless a file can be created at `path` (checked before any work)."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name, e.g. {path / 'out.csv'}")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", delete=True):
            pass
    except OSError as exc:
        raise UserError(f"cannot write --out {path} ({exc.strerror or exc}); create the folder "
                        "or choose a writable path") from exc


def write_csv(path: Path, rows: list[Row], classes: list[str]) -> None:
    """The CSV, written beside `path` and renamed into place (never half a file)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent if str(path.parent) else ".",
                                     prefix=f".{path.name}.", suffix=".part", delete=False,
                                     newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "pred", "pred_class", *[f"p_{c}" for c in classes], "top3", "error"])
        for r in rows:
            if r.probs is None:
                w.writerow([r.path, "", "", *[""] * len(classes), "", r.error])
                continue
            order = sorted(range(len(classes)), key=lambda i: -r.probs[i])
            w.writerow([r.path, order[0], classes[order[0]], *[f"{p:.6f}" for p in r.probs],
                        ";".join(classes[i] for i in order[:3]), ""])
    os.replace(fh.name, path)


def summary(rows: list[Row], classes: list[str], seconds: float, model_seconds: float) -> str:
    done = [r for r in rows if r.probs is not None]
    counts = Counter(classes[max(range(len(classes)), key=r.probs.__getitem__)] for r in done)
    lines = [f"kvasir-predict: {len(done)} of {len(rows)} images predicted"
             f" ({len(rows) - len(done)} with errors)"]
    lines += [f"  {c:<28} {counts.get(c, 0):>7}" for c in classes]
    if done:
        lines.append(f"  {len(done) / seconds:.1f} images/s end to end, "
                     f"{len(done) / max(model_seconds, 1e-9):.1f} images/s in the model")
    lines += [f"  error: {r.path}: {r.error}" for r in rows if r.probs is None][:10]
    return "\n".join(lines)


def _write_stopped(out: Path, rows: list[Row], pending: list[Path], classes: list[str],
                   stop: BaseException) -> None:
    """Ctrl-C or SIGTERM: the CSV still gets a row per input, those not reached saying so (a
    shards folder being predicted gets one row)."""
    why = "not predicted: stopped by " + ("SIGINT" if isinstance(stop, KeyboardInterrupt)
                                          else "SIGTERM")
    for r in rows:
        if r.probs is None and not r.error:
            r.error = why
    rows += [Row(str(d), error=why) for d in pending]
    write_csv(out, rows, classes)
    done = sum(r.probs is not None for r in rows)
    print(f"kvasir-predict: wrote {out} ({done} of {len(rows)} predicted before the stop)",
          file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvasir-predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="--debug (or KVASIR_DEBUG=1) shows tracebacks of errors")
    ap.add_argument("ckpt", help="checkpoint written by kvasir-train (.ckpt)")
    ap.add_argument("inputs", nargs="+", help="image files, folders of images, shards folders")
    ap.add_argument("--out", default="predictions.csv", help="CSV to write")
    ap.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="32", choices=["32", "16", "bf16"])
    ap.add_argument("--num-threads", type=int, default=2, help="DALI and checking threads")
    ap.add_argument("--split", default="test", help="split of a shards folder to predict")
    ap.add_argument("--cam", default=None, metavar="DIR",
                    help="also write class-activation heatmaps of the predicted class to DIR")
    return ap


def _run(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    start = time.perf_counter()
    out = Path(a.out)
    writable(out)
    predictor = Predictor(a.ckpt, Options(a.device, a.batch_size, a.precision, a.num_threads,
                                          a.split))
    rows, shard_dirs = gather(a.inputs)
    if not rows and not shard_dirs:
        raise UserError(f"no image files in {' '.join(a.inputs)} (looked for names ending "
                        "in .jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp, .gif)")
    cams = None
    if a.cam:
        from .cam import CamWriter

        cams = CamWriter(Path(a.cam), predictor)
    pending = list(shard_dirs)  # shards folders not predicted yet
    try:
        predictor.files(rows, cams)
        while pending:
            rows += predictor.shards(pending[0], cams)
            pending.pop(0)
    except (KeyboardInterrupt, Terminated) as stop:  # keep what was predicted, name the rest
        _write_stopped(out, rows, pending, predictor.classes, stop)
        raise
    write_csv(out, rows, predictor.classes)
    print(summary(rows, predictor.classes, time.perf_counter() - start, predictor.model_seconds))
    if cams is not None:
        print(f"kvasir-predict: wrote {cams.finish()}", file=sys.stderr)
    print(f"kvasir-predict: wrote {out}", file=sys.stderr)
    done = sum(r.probs is not None for r in rows)
    return 0 if done == len(rows) else (1 if done else 2)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kvasir-predict`."""
    return run_command("kvasir-predict", _run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
