"""Images/sec side by side: loaders, model only, full training step, packing, core scaling.

    python benchmarks/throughput.py [--shards DIR] [--quick] [--loaders dali-cpu torch-pil ...]

Every figure comes from one run on the same shards, same augmentations and output (batches of
S x S normalized images on the training device). Warm-up batches are excluded; each figure is
the median of `repeats` timed runs with p10/p90; device work is synchronized before a clock is
read. Writes benchmarks/results/<environment>.json and .png and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loaders as L  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class BenchSpec:
    shards: str | None = None
    loaders: list[str] = field(default_factory=lambda: ["dali-cpu", "torch-pil", "wds-pil"])
    batch_size: int = 32
    image_size: int = 384
    model: str = "fastvit_t8"
    batches: int = 8  # timed batches per repeat
    warmup: int = 2
    repeats: int = 3
    workers: int = 0  # threads/workers per loader (0: all cores)
    scaling: bool = True
    inference: bool = True  # forward-only: unfused vs reparameterized, ONNX Runtime
    max_side: int = 0  # >0: also dali-cpu on shards packed with --max-side this
    quick: bool = False
    out: str = str(RESULTS)


def _cpu_seconds() -> float:
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _rss() -> int:
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]
               if p.is_running())


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _stats(rates: list[float]) -> dict:
    return {"images_per_s": float(np.median(rates)), "p10": float(np.percentile(rates, 10)),
            "p90": float(np.percentile(rates, 90)), "repeats": len(rates)}


def time_loader(make, spec: BenchSpec, step=None) -> dict:
    """Median images/sec over repeats; with `step`, the full training step and data wait."""
    loader = make()
    it = iter(loader)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    for _ in range(spec.warmup):
        b = next_batch()
        if step:
            step(b)
    rates, waits, cpu, peak = [], [], [], 0
    for _ in range(spec.repeats):
        _sync()
        c0, t0, wait = _cpu_seconds(), time.perf_counter(), 0.0
        n = 0
        for _ in range(spec.batches):
            w0 = time.perf_counter()
            b = next_batch()
            wait += time.perf_counter() - w0
            n += len(b[1])
            if step:
                step(b)
        _sync()
        dt = time.perf_counter() - t0
        rates.append(n / dt)
        waits.append(wait / dt)
        cpu.append((_cpu_seconds() - c0) / n * 1000)
        peak = max(peak, _rss())
    out = _stats(rates) | {"cpu_s_per_1000": float(np.median(cpu)), "peak_rss_mb": peak / 2**20}
    if step:
        out["data_wait_share"] = float(np.median(waits))
    return out


def model_step(spec: BenchSpec, device: torch.device):
    import timm

    model = timm.create_model(spec.model, num_classes=8).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = device.type == "cuda"

    def step(batch):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_model(spec: BenchSpec, device: torch.device) -> dict:
    step = model_step(spec, device)
    x = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, device=device)
    y = torch.randint(0, 8, (spec.batch_size,), device=device)
    return time_loader(lambda: itertools.repeat((x, y)), spec, step)  # batch already on device


def time_inference(spec: BenchSpec, device: torch.device) -> dict:
    """Forward-only images/sec: unfused vs reparameterized FastViT, and ONNX Runtime (CPU)."""
    import timm
    from timm.utils import reparameterize_model

    from kvasir_dali.export import export
    from kvasir_dali.inference import Preprocess

    plain = timm.create_model(spec.model, num_classes=8).eval()
    fused = reparameterize_model(plain)
    x = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size)
    y = torch.zeros(spec.batch_size, dtype=torch.long)
    amp = device.type == "cuda"
    out = {}
    for name, model in (("pytorch-unfused", plain), ("pytorch-fused", fused)):
        m, xd = model.to(device), x.to(device)

        def forward(_batch, m=m, xd=xd):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                m(xd)

        out[name] = time_loader(lambda: itertools.repeat((x, y)), spec, forward)
        out[name].pop("data_wait_share", None)
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed: no ONNX Runtime figure", flush=True)
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        pre = Preprocess(spec.model, [str(i) for i in range(8)], spec.image_size, (0.5,) * 3,
                         (0.5,) * 3)
        export(fused.cpu(), pre, "onnx", path, x[:2])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        out["onnxruntime-cpu-fused"] = time_loader(lambda: itertools.repeat((x, y)), spec,
                                                   lambda _b: sess.run(None, feed))
        out["onnxruntime-cpu-fused"].pop("data_wait_share", None)
    return out


def environment() -> dict:
    import nvidia.dali as dali
    import timm

    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "cuda": torch.version.cuda if gpu else None, "torch": torch.__version__,
            "dali": dali.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "git_commit": commit}


def data_stats(shards: Path) -> dict:
    import csv

    rows = list(csv.DictReader(open(shards / "samples.csv")))
    px = np.array([int(r["packed_width"]) * int(r["packed_height"]) for r in rows])
    by = np.array([int(r["packed_bytes"]) for r in rows])
    sizes = {}
    for r in rows:
        k = f"{r['packed_width']}x{r['packed_height']}"
        sizes[k] = sizes.get(k, 0) + 1
    return {"images": len(rows), "bits_per_pixel": float((by * 8).sum() / px.sum()),
            "sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1]))}


def timed_build(src: str, out: Path, max_side: int = 0) -> dict:
    """kvasir-shard build of `src` into `out`, timed: the packing rate."""
    from shard_tools.build import BuildSpec, build

    t0 = time.perf_counter()
    m = build(BuildSpec(src=src, out=str(out), max_side=max_side))
    dt = time.perf_counter() - t0
    mb = sum(r.size for r in m["_records"]) / 1e6
    return {"images_per_s": m["source_files"] / dt, "mb_per_s": mb / dt,
            "workers": m["_workers"], "max_side": max_side}


def make_data(tmp: Path, per_class: int) -> tuple[Path, dict]:
    """A synthetic set packed into tmp/shards, and its packing rate."""
    from shard_tools.synth import synth

    synth(tmp / "src", per_class=per_class, seed=0)
    return tmp / "shards", timed_build(str(tmp / "src"), tmp / "shards")


def repack(shards: Path, out: Path, max_side: int = 0) -> dict:
    """Re-pack the source of `shards` (same seed and split) into `out`, timed."""
    return timed_build(json.loads((shards / "manifest.json").read_text())["source"], out,
                       max_side)


def run(spec: BenchSpec) -> dict:
    cores = os.cpu_count() or 1
    workers = spec.workers or cores
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res: dict = {"spec": asdict(spec), "environment": environment(), "loader": {},
                 "full_step": {}, "scaling": {}}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(spec.shards) if spec.shards else None
        if shards is None:
            shards, res["packing"] = make_data(Path(tmp), 12 if spec.quick else 40)
        elif not spec.quick:
            res["packing"] = repack(shards, Path(tmp) / "repacked")
        res["data"] = data_stats(shards)
        make = {
            "dali-cpu": lambda w: (lambda: L.dali(shards, spec.batch_size, spec.image_size, w,
                                                  spec.model)),
            "dali-gpu": lambda w: (lambda: L.dali(shards, spec.batch_size, spec.image_size, w,
                                                  spec.model, "gpu")),
            "torch-pil": lambda w: (lambda: L.torch_pil(shards, spec.batch_size,
                                                        spec.image_size, w, spec.model)),
            "wds-pil": lambda w: (lambda: L.wds_pil(shards, spec.batch_size, spec.image_size,
                                                    w, spec.model)),
            "torch-nvjpeg": lambda w: (lambda: L.torch_nvjpeg(shards, spec.batch_size,
                                                              spec.image_size, w, spec.model)),
        }
        if spec.max_side:  # the same images packed pre-downscaled: the CPU lever, as deployed
            small = Path(tmp) / f"shards-max{spec.max_side}"
            res["packing_max_side"] = repack(shards, small, spec.max_side)
            res["data_max_side"] = data_stats(small)
            make[f"dali-cpu-max{spec.max_side}"] = lambda w: (
                lambda: L.dali(small, spec.batch_size, spec.image_size, w, spec.model))
            spec.loaders = [*spec.loaders, f"dali-cpu-max{spec.max_side}"]
        gpu_only = ("dali-gpu", "torch-nvjpeg")
        names = [n for n in spec.loaders if n not in gpu_only or device.type == "cuda"]
        for name in names:
            print(f"loader {name} ...", flush=True)
            res["loader"][name] = time_loader(make[name](workers), spec)
        print("model only ...", flush=True)
        res["model_only"] = time_model(spec, device)
        for name in names:
            if name.startswith("dali") and (name == "dali-gpu") != (device.type == "cuda"):
                continue  # the full step pairs the GPU model with the GPU loader
            print(f"full step {name} ...", flush=True)
            res["full_step"][name] = time_loader(make[name](workers), spec,
                                                 model_step(spec, device))
        if spec.inference:
            print("inference ...", flush=True)
            res["inference"] = time_inference(spec, device)
        if spec.scaling:
            for name in names:
                res["scaling"][name] = {}
                for w in sorted({1, *range(2, cores + 1, max(1, cores // 4))}):
                    print(f"scaling {name} x{w} ...", flush=True)
                    res["scaling"][name][w] = time_loader(make[name](w), spec)["images_per_s"]
    return res


def table(res: dict) -> str:
    base = res["loader"].get("torch-pil", {}).get("images_per_s")
    model = res["model_only"]["images_per_s"]
    env = res["environment"]
    lines = [f"{env['cpu']}, {env['cores']} cores, GPU {env['gpu']}; data "
             f"{res['data']['images']} images at {res['data']['bits_per_pixel']:.2f} bits/px; "
             f"batch {res['spec']['batch_size']}, {res['spec']['image_size']} px",
             "", "| mode | loader | images/s (p10-p90) | vs torch-pil | vs model-only | "
             "data wait | CPU s/1000 img |", "|---|---|---|---|---|---|---|"]
    for mode in ("loader", "full_step"):
        for name, r in res[mode].items():
            ratio = f"{r['images_per_s'] / base:.2f}x" if base and mode == "loader" else ""
            vs_model = f"{r['images_per_s'] / model:.2f}" if mode == "full_step" else ""
            wait = f"{100 * r['data_wait_share']:.0f}%" if "data_wait_share" in r else ""
            lines.append(f"| {mode} | {name} | {r['images_per_s']:.1f} ({r['p10']:.1f}-"
                         f"{r['p90']:.1f}) | {ratio} | {vs_model} | {wait} | "
                         f"{r['cpu_s_per_1000']:.1f} |")
    m = res["model_only"]
    lines.append(f"| model_only | {res['spec']['model']} | {m['images_per_s']:.1f} "
                 f"({m['p10']:.1f}-{m['p90']:.1f}) | | 1.00 | | {m['cpu_s_per_1000']:.1f} |")
    for key in ("packing", "packing_max_side"):
        if key in res:
            p = res[key]
            extra = f" with --max-side {p['max_side']}" if p.get("max_side") else ""
            lines.append(f"packing (kvasir-shard build{extra}): {p['images_per_s']:.0f} "
                         f"images/s, {p['mb_per_s']:.1f} MB/s on {p['workers']} workers")
    for name, r in res.get("inference", {}).items():
        lines.append(f"inference {name}: {r['images_per_s']:.1f} images/s "
                     f"({r['p10']:.1f}-{r['p90']:.1f}), batch {res['spec']['batch_size']}")
    for name, s in res["scaling"].items():
        lines.append(f"scaling {name}: " + ", ".join(f"{w}: {v:.0f}" for w, v in s.items()))
    return "\n".join(lines)


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{k}\n(loader)", v["images_per_s"]) for k, v in res["loader"].items()]
    bars += [(f"{k}\n(full step)", v["images_per_s"]) for k, v in res["full_step"].items()]
    bars.append(("model only", res["model_only"]["images_per_s"]))
    fig, ax = plt.subplots(figsize=(1.3 * len(bars) + 2, 3.8))
    ax.bar(range(len(bars)), [b[1] for b in bars], color="tab:blue")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    env = res["environment"]
    ax.set_ylabel("images / s")
    ax.set_title(f"{res['spec']['image_size']} px, batch {res['spec']['batch_size']}; "
                 f"{env['cores']} cores, GPU {env['gpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    d = BenchSpec()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="shards folder (default: build a synthetic set)")
    p.add_argument("--loaders", nargs="+", default=None,
                   choices=["dali-gpu", "dali-cpu", "torch-pil", "wds-pil", "torch-nvjpeg"])
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--model", default=d.model)
    p.add_argument("--batches", type=int, default=d.batches)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--no-inference", action="store_true")
    p.add_argument("--max-side", type=int, default=0,
                   help="also time dali-cpu on shards re-packed with this --max-side")
    p.add_argument("--quick", action="store_true", help="a run of under two minutes on 2 cores")
    p.add_argument("--out", default=d.out)
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    spec = BenchSpec(shards=a.shards, batch_size=a.batch_size, image_size=a.image_size,
                     model=a.model, batches=a.batches, repeats=a.repeats, workers=a.workers,
                     scaling=not a.no_scaling, inference=not a.no_inference, quick=a.quick,
                     out=a.out, max_side=a.max_side,
                     loaders=a.loaders or (["dali-gpu", "torch-nvjpeg"] if gpu else []) + d.loaders)
    if a.quick:
        spec.batch_size, spec.batches, spec.repeats, spec.warmup = 8, 2, 2, 1
        spec.image_size = min(spec.image_size, 224)
        spec.scaling = False
    res = run(spec)
    env = res["environment"]
    name = "-".join(str(x) for x in (env["cpu"].split("@")[0].strip(), f"{env['cores']}c",
                                     env["gpu"] or "nogpu", "quick" if spec.quick else "full"))
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    chart(res, out / f"{name}.png")
    text = table(res)
    (out / f"{name}.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / name}.json, .md and .png")
    return res


if __name__ == "__main__":
    main()
