"""DALI on the GPU in about 30 s: the project's graphs on tiny synthetic shards, one line a check.

    python benchmarks/gpu_smoke.py [--image-size 384] [--batch-size 8]

Checks, through `kvasir_dali.data.DaliLoader` as training uses it: the training and evaluation
graphs on GPU 0 in fp16 channels-last deliver CUDA tensors of the right dtype, shape and memory
format; the evaluation split comes out whole, once; a GPU evaluation batch is close to the CPU
graph's (hardware/CUDA vs libjpeg-turbo decode, fp16); a DALI checkpoint taken after an epoch
gives a new loader the same next batch. Then, for information, the nvJPEG libraries mapped.
Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from kvasir_dali.loader import DaliLoader
from kvasir_dali.pipeline import PipeSpec
from kvasir_dali.shards import ShardSet
from shard_tools.build import BuildSpec, build
from shard_tools.synth import synth

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
failures: list[str] = []


def check(name: str, fn: Callable[[], str]) -> None:
    """Run one check and print one line: PASS/FAIL, its name, what it saw, seconds."""
    t0 = time.perf_counter()
    try:
        status, detail = "PASS", fn()
    except Exception as exc:  # noqa: BLE001 - every check reports, the next still runs
        status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        failures.append(name)
    print(f"{status} {name}: {detail} ({time.perf_counter() - t0:.1f} s)", flush=True)


def make_shards(tmp: Path) -> Path:
    synth(tmp / "src", per_class=8, seed=0)
    build(BuildSpec(src=str(tmp / "src"), out=str(tmp / "shards"), val_fraction=0.25,
                    test_fraction=0.25))
    return tmp / "shards"


def spec_for(shards: Path, split: str, size: int, batch: int, gpu: bool) -> PipeSpec:
    f = ShardSet.open(shards).files(split)
    return PipeSpec(tars=f.tars, indexes=f.indexes, batch_size=batch, image_size=size,
                    mean=MEAN, std=STD, train=split == "train",
                    device="gpu" if gpu else "cpu", device_id=0 if gpu else None,
                    num_threads=4, fp16=gpu, channels_last=gpu, shuffle_buffer=f.count)


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def check_batch(images: torch.Tensor, labels: torch.Tensor, batch: int, size: int) -> str:
    expect(images.is_cuda and labels.is_cuda, f"not on the GPU: {images.device}, {labels.device}")
    expect(images.dtype == torch.float16, f"images {images.dtype}, expected float16")
    expect(tuple(images.shape) == (batch, 3, size, size), f"shape {tuple(images.shape)}")
    expect(images.is_contiguous(memory_format=torch.channels_last), "not channels-last")
    expect(labels.dtype == torch.int64 and labels.shape == (batch,), f"labels {labels.dtype}")
    expect(bool(torch.isfinite(images).all()), "non-finite pixels")
    return f"{tuple(images.shape)} {images.dtype} channels-last on {images.device}"


def train_graph(shards: Path, size: int, batch: int) -> str:
    images, labels = next(iter(DaliLoader(spec_for(shards, "train", size, batch, True))))
    return check_batch(images, labels, batch, size)


def eval_graph(shards: Path, size: int, batch: int) -> str:
    loader = DaliLoader(spec_for(shards, "val", size, batch, True))
    keys = []
    for images, labels, k in loader:
        check_batch(images, labels, len(k), size)
        keys += k.tolist()
    count = ShardSet.open(shards).files("val").count
    expect(sorted(keys) == sorted(set(keys)) and len(keys) == count,
           f"{len(keys)} keys ({len(set(keys))} distinct), split has {count}")
    return f"{count} samples once each in {len(loader)} batches"


def gpu_vs_cpu(shards: Path, size: int, batch: int) -> str:
    gpu = next(iter(DaliLoader(spec_for(shards, "val", size, batch, True))))
    cpu = next(iter(DaliLoader(spec_for(shards, "val", size, batch, False))))
    expect(torch.equal(gpu[2].cpu(), cpu[2]), "the two graphs read different samples")
    diff = (gpu[0].float().cpu() - cpu[0]).abs()
    expect(diff.mean() < 0.05, f"mean |diff| {diff.mean():.4f} >= 0.05")
    return f"mean |diff| {diff.mean():.4f}, max {diff.max():.3f} (normalized units)"


def nvjpeg_libraries() -> str:
    """Which nvJPEG the process has mapped after the GPU graphs ran (information, not a
    check: torchvision brings its own libnvjpeg.so.13, and one SONAME is one library per
    process, so nvImageCodec may decode with either copy)."""
    maps = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
            if "nvjpeg" in line and "/" in line}
    return ", ".join(sorted(maps)) or "none mapped: the mixed decoder is not using nvJPEG"


def checkpoint_round_trip(shards: Path, size: int, batch: int) -> str:
    spec = spec_for(shards, "train", size, batch, True)
    a = DaliLoader(spec)
    epoch1 = sum(1 for _ in a)
    state = a.state()  # where epoch 2 starts
    want = next(iter(a))
    b = DaliLoader(replace(spec, checkpoint=state))
    got = next(iter(b))
    expect(torch.equal(a.last_keys, b.last_keys), "different samples after the checkpoint")
    diff = (want[0].float() - got[0].float()).abs().max().item()
    expect(diff == 0 and torch.equal(want[1], got[1]), f"same keys, images differ by {diff}")
    return f"epoch of {epoch1} batches, then the same batch from the checkpoint ({len(state)} B)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("FAIL cuda: no CUDA GPU visible to torch", flush=True)
        return 1
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards = make_shards(Path(tmp))
        print(f"shards: {ShardSet.open(shards).count('train')} train images "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        for name, fn in (("train graph", train_graph), ("eval graph", eval_graph),
                         ("gpu vs cpu", gpu_vs_cpu), ("checkpoint", checkpoint_round_trip)):
            check(name, lambda fn=fn: fn(shards, a.image_size, a.batch_size))
        print(f"INFO nvjpeg: {nvjpeg_libraries()}", flush=True)
    print(("FAILED: " + ", ".join(failures)) if failures else "all checks passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
