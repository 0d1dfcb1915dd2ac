"""Prediction as a library: `Predictor(ckpt, Options()).files(paths)` -> one `Row` per input.

Inputs are gathered by `gather(inputs)`: image files, folders (searched recursively, links
followed, hidden files skipped) and shards folders. Nothing is dropped and nothing can hang:
every path named, and every image-named entry of a folder, gets a row; a FIFO, device, socket,
directory named like an image, broken link or oversized file gets its error without being
opened. Every file is fully decoded on the CPU first (DALI stops a whole pipeline at one
corrupt JPEG), and files the shard builder would convert (progressive, PNG, CMYK,
EXIF-rotated) are converted the same way, so the model sees what it saw in training. Images
then go through the training's evaluation graph (DALI, on the GPU when there is one).
Errors the user can fix raise `UserError`s; DALI is imported only when images are predicted.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from shard_tools.errors import UserError
from shard_tools.imagecheck import convert, inspect
from shard_tools.manifest import MANIFEST, key_name, samples
from shard_tools.source import DEFAULT_MAX_FILE_MB, IMAGE_SUFFIXES, SYSTEM_NAMES

from .inference import load_checkpoint

# Called per batch with (its rows, images (N, 3, S, S) normalized, probabilities (N, C)).
BatchHook = Callable[[list["Row"], torch.Tensor, torch.Tensor], None]


@dataclass
class Row:
    """One input's outcome; `probs` is None when it could not be predicted."""

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


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in SYSTEM_NAMES


def _walk(folder: Path) -> list[Row]:
    """Image-named entries below `folder` (links followed, loops cut), in path order;
    directories named like images get their error row."""
    rows, seen, todo = [], set(), [folder]
    while todo:
        d = todo.pop()
        if os.path.realpath(d) in seen:
            continue
        seen.add(os.path.realpath(d))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            rows.append(Row(str(d), error=f"folder not readable: {exc.strerror or exc}"))
            continue
        for entry in entries:
            if _hidden(entry.name):
                continue
            path = Path(entry.path)
            is_dir = entry.is_dir()  # follows links
            if is_dir:
                todo.append(path)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                rows.append(Row(str(path), error="a directory, not an image file" if is_dir
                                else ""))
    return sorted(rows, key=lambda r: r.path)


def gather(inputs: list[str]) -> tuple[list[Row], list[Path]]:
    """(a row per image input, in input order; shards folders)."""
    rows, shard_dirs = [], []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir() and (p / MANIFEST).is_file():
            shard_dirs.append(p)
        elif p.is_dir():
            rows += _walk(p)
        else:
            rows.append(Row(str(p)))  # named explicitly: predicted or given an error row
    return rows, shard_dirs


def _check(path: Path, tmp: Path, n: int) -> tuple[Path | None, str]:
    """(file DALI should read, error); never opens anything but a regular file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, ("broken symbolic link (its target does not exist)" if path.is_symlink()
                      else "does not exist")
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return None, "a directory, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file (a FIFO, socket or device): not read"
    if st.st_size > DEFAULT_MAX_FILE_MB * 2**20:
        return None, f"file of {st.st_size / 2**20:.0f} MiB: too large for an image"
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
            raise UserError("--device gpu, but no CUDA GPU is visible; use --device cpu")
        if opts.precision == "16" and not gpu:
            raise UserError("--precision 16 needs a GPU; use bf16 or 32 on the CPU")
        if opts.batch_size < 1 or opts.num_threads < 1:
            raise UserError("--batch-size and --num-threads must be 1 or more")
        self.opts, self.gpu = opts, gpu
        self.torch_device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        model, self.pre = load_checkpoint(ckpt)
        self.model = model.to(self.torch_device)
        self.model_seconds = 0.0  # inside the model: for the summary's images/s

    @property
    def classes(self) -> list[str]:
        return self.pre.classes

    def spec(self, **kw):
        """The evaluation graph's PipeSpec for this model, with `kw` overrides."""
        from .pipeline import PipeSpec

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

    def files(self, rows: list[Row], hook: BatchHook | None = None) -> list[Row]:
        """Fill in `rows` (from `gather`): probabilities, or the error of each file."""
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from .pipeline import build_pipeline

        todo = [i for i, r in enumerate(rows) if not r.error]
        with tempfile.TemporaryDirectory(prefix="kvasir-predict-") as tmp, \
                ThreadPoolExecutor(self.opts.num_threads) as pool:
            checked = list(tqdm(pool.map(_check, [Path(rows[i].path) for i in todo],
                                         [Path(tmp)] * len(todo), range(len(todo))),
                                total=len(todo), desc="checking", unit="img", leave=False))
            readable = [(i, f) for i, (f, _) in zip(todo, checked) if f is not None]
            for i, (_, err) in zip(todo, checked):
                rows[i].error = err
            if not readable:
                return rows
            pipe = build_pipeline(self.spec(files=tuple(str(f) for _, f in readable)))
            it = DALIGenericIterator(pipe, ["images", "ids"], reader_name="Reader",
                                     last_batch_policy=LastBatchPolicy.PARTIAL)
            for batch in tqdm(it, total=len(it), desc="predicting", unit="batch"):
                images, probs = batch[0]["images"], self.probs(batch[0]["images"])
                done = [rows[readable[j][0]] for j in batch[0]["ids"][:, 0].tolist()]
                for row, p in zip(done, probs.tolist()):
                    row.probs = p
                if hook:
                    hook(done, images, probs)
        return rows

    def shards(self, root: Path, hook: BatchHook | None = None) -> list[Row]:
        """A row per sample of the chosen split, named by its source file, in key order."""
        from .loader import DaliLoader
        from .shards import ShardSet

        shard_set = ShardSet.open(root)
        split = shard_set.files(self.opts.split)  # checked against the manifest
        source = {s.key: s.source for s in samples(root)}
        src_root = Path(shard_set.manifest.source)
        loader = DaliLoader(self.spec(tars=split.tars, indexes=split.indexes,
                                      exts=(split.components.image, split.components.label)))
        by_key: dict[int, Row] = {}
        for images, _, keys in tqdm(loader, total=len(loader), desc="predicting", unit="batch"):
            probs = self.probs(images)
            done = [Row(str(src_root / source[key_name(k)]), p)
                    for k, p in zip(keys.tolist(), probs.tolist())]
            by_key.update(zip(keys.tolist(), done))
            if hook:
                hook(done, images, probs)
        return [row for _, row in sorted(by_key.items())]
