"""`kvasir-predict CKPT INPUT... --out predictions.csv`: classify images with a trained model.

INPUT is any mix of image files, folders (searched recursively for image files) and shards
folders (one split, `--split`). Images go through the training's evaluation graph (DALI on the
GPU when there is one), the model is reparameterized once at load. Every file is fully decoded
on the CPU first: DALI stops the whole pipeline at one corrupt JPEG, so a file that does not
decode gets a row with its error instead, and files the shard builder would have converted
(progressive, PNG, CMYK, EXIF-rotated...) are converted the same way, so the model sees what it
saw in training.

Output columns: path, pred (class index), pred_class, p_<class> for every class, top3 (class
names, best first, ';'-separated), error (empty when predicted).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from tqdm import tqdm

from shard_tools.imagecheck import convert, inspect

from .data import DaliLoader
from .inference import CheckpointError, load_checkpoint
from .pipeline import PipeSpec, build_pipeline
from .shards import ShardError, ShardSet

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class Row:
    """One input's outcome; `probs` is None when the file could not be predicted."""

    path: str
    probs: list[float] | None = None
    error: str = ""


@dataclass(frozen=True)
class Options:
    device: str = "auto"  # auto | gpu | cpu
    batch_size: int = 32
    precision: str = "32"  # 32 | 16 (GPU) | bf16
    num_threads: int = 2
    split: str = "test"  # of a shards folder


def image_files(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """(image files in input order, shards folders); folders are searched recursively."""
    files, shard_dirs = [], []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise SystemExit(f"kvasir-predict: {p} does not exist")
        if p.is_dir() and (p / "manifest.json").is_file():
            shard_dirs.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and f.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") or part == "__MACOSX"
                                        for part in f.relative_to(p).parts))
        else:
            files.append(p)  # named explicitly: predicted or given an error row, never skipped
    return files, shard_dirs


def _check(path: Path, tmp: Path, n: int) -> tuple[Path | None, str]:
    """(file DALI should read, error). Converted copies go to `tmp`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    verdict = inspect(data)
    if not verdict.ok:
        return None, verdict.error
    if verdict.convert:
        out = tmp / f"{n:08d}.jpg"
        out.write_bytes(convert(data)[0])
        return out, ""
    return path, ""


class Predictor:
    """A reparameterized model and the evaluation graph's settings, on one device."""

    def __init__(self, ckpt: str, opts: Options) -> None:
        gpu = opts.device == "gpu" or (opts.device == "auto" and torch.cuda.is_available())
        if gpu and not torch.cuda.is_available():
            raise SystemExit("kvasir-predict: --device gpu but no CUDA GPU is visible")
        if opts.precision == "16" and not gpu:
            raise SystemExit("kvasir-predict: --precision 16 needs a GPU; use bf16 or 32 on CPU")
        self.opts, self.gpu = opts, gpu
        self.torch_device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        model, self.pre = load_checkpoint(ckpt)
        self.model = model.to(self.torch_device)
        self.model_seconds = 0.0  # inside the model: for the summary's images/s

    @property
    def classes(self) -> list[str]:
        return self.pre.classes

    def spec(self, **kw) -> PipeSpec:
        p = self.pre
        return PipeSpec(**{"tars": [], "indexes": [], "batch_size": self.opts.batch_size,
                           "image_size": p.image_size, "mean": p.mean, "std": p.std,
                           "train": False, "device": "gpu" if self.gpu else "cpu",
                           "device_id": 0 if self.gpu else None,
                           "num_threads": self.opts.num_threads, **kw})

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalized images -> (N, C) float32 probabilities on the CPU."""
        dtype = {"16": torch.float16, "bf16": torch.bfloat16}.get(self.opts.precision)
        ctx = torch.autocast(self.torch_device.type, dtype=dtype) if dtype else nullcontext()
        start = time.perf_counter()
        with ctx:
            out = self.model(images.to(self.torch_device)).float().softmax(-1).cpu()
        self.model_seconds += time.perf_counter() - start
        return out

    def files(self, files: list[Path]) -> list[Row]:
        """A row per file, in order; undecodable files get their error."""
        rows = [Row(str(f)) for f in files]
        with tempfile.TemporaryDirectory(prefix="kvasir-predict-") as tmp, \
                ThreadPoolExecutor(max(1, self.opts.num_threads)) as pool:
            checked = list(tqdm(pool.map(_check, files, [Path(tmp)] * len(files),
                                         range(len(files))),
                                total=len(files), desc="checking", unit="img", leave=False))
            readable = [(i, f) for i, (f, _) in enumerate(checked) if f is not None]
            for row, (_, err) in zip(rows, checked):
                row.error = err
            if not readable:
                return rows
            pipe = build_pipeline(self.spec(files=tuple(str(f) for _, f in readable)))
            it = DALIGenericIterator(pipe, ["images", "ids"], reader_name="Reader",
                                     last_batch_policy=LastBatchPolicy.PARTIAL)
            for batch in tqdm(it, total=len(it), desc="predicting", unit="batch"):
                probs = self.probs(batch[0]["images"])
                for j, p in zip(batch[0]["ids"][:, 0].tolist(), probs.tolist()):
                    rows[readable[j][0]].probs = p
        return rows

    def shards(self, root: Path) -> list[Row]:
        """A row per sample of the chosen split, named by its source file, in key order."""
        try:
            shard_set = ShardSet.open(root)
            split = shard_set.files(self.opts.split)
        except ShardError as exc:
            raise SystemExit(f"kvasir-predict: {exc}") from exc
        with open(root / "samples.csv") as fh:
            source = {r["key"]: r["source"] for r in csv.DictReader(fh) if r["key"]}
        src_root = Path(str(shard_set.manifest.get("source", "")))
        loader = DaliLoader(self.spec(tars=split.tars, indexes=split.indexes))
        by_key: dict[int, list[float]] = {}
        for images, _, keys in tqdm(loader, total=len(loader), desc="predicting", unit="batch"):
            for k, p in zip(keys.tolist(), self.probs(images).tolist()):
                by_key[k] = p
        return [Row(str(src_root / source[f"{k:06d}"]), p) for k, p in sorted(by_key.items())]


def write_csv(path: Path, rows: list[Row], classes: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "pred", "pred_class", *[f"p_{c}" for c in classes], "top3", "error"])
        for r in rows:
            if r.probs is None:
                w.writerow([r.path, "", "", *[""] * len(classes), "", r.error])
                continue
            order = sorted(range(len(classes)), key=lambda i: -r.probs[i])
            w.writerow([r.path, order[0], classes[order[0]], *[f"{p:.6f}" for p in r.probs],
                        ";".join(classes[i] for i in order[:3]), ""])


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvasir-predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="checkpoint written by kvasir-train (.ckpt)")
    ap.add_argument("inputs", nargs="+", help="image files, folders of images, shards folders")
    ap.add_argument("--out", default="predictions.csv", help="CSV to write")
    ap.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="32", choices=["32", "16", "bf16"])
    ap.add_argument("--num-threads", type=int, default=2, help="DALI and checking threads")
    ap.add_argument("--split", default="test", help="split of a shards folder to predict")
    a = ap.parse_args(argv)
    opts = Options(a.device, a.batch_size, a.precision, a.num_threads, a.split)
    start = time.perf_counter()
    try:
        predictor = Predictor(a.ckpt, opts)
    except CheckpointError as exc:
        raise SystemExit(f"kvasir-predict: {exc}") from exc
    files, shard_dirs = image_files(a.inputs)
    if not files and not shard_dirs:
        raise SystemExit(f"kvasir-predict: no image files in {' '.join(a.inputs)} (looked for "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    rows = predictor.files(files) if files else []
    for root in shard_dirs:
        rows += predictor.shards(root)
    write_csv(Path(a.out), rows, predictor.classes)
    print(summary(rows, predictor.classes, time.perf_counter() - start, predictor.model_seconds))
    print(f"kvasir-predict: wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
