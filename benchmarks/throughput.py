"""Images/sec side by side: loaders, model only, full training step, packing, core scaling.

    python benchmarks/throughput.py [--shards DIR] [--quick] [--loaders dali-cpu torch-pil ...]

Every figure comes from one run on the same shards, same augmentations and output (batches of
S x S normalized images on the training device). Warm-up batches are excluded; each figure is
the median of `repeats` timed runs with p10/p90; device work is synchronized before a clock is
read. Writes benchmarks/results/<environment>.json and .png and prints a table.

Several `--model`s or `--batch-size`s make a sweep over every combination on one data set:
one JSON (`{"environment", "runs": [...]}`) and one table file, rewritten after each run so a
timeout keeps what was measured. A loader that cannot be built or fails (a library missing, a
runtime error) is recorded as `{"error": "ImportError: ..."}` and the others still run.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loaders as L  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOADERS = ["dali-gpu", "dali-cpu", "torch-pil", "wds-pil", "torch-nvjpeg"]


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
    loader_only: bool = True  # the loader-only block; a sweep times it for its first model only
    inference: bool = True  # forward-only: unfused vs reparameterized, ONNX Runtime
    max_side: int = 0  # >0: also dali-cpu on shards packed with --max-side this
    quick: bool = False
    out: str = str(RESULTS)
    scaling_threads: list[int] | None = None  # None: 1, then up to all cores in about 4 steps
    scaling_loaders: list[str] | None = None  # None: every loader timed
    per_class: int = 0  # synthetic set, images per class (0: 40, 12 with --quick)


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


def _dali_version() -> str | None:
    try:
        import nvidia.dali as dali
    except ImportError:  # the torch loaders are still timed; dali-* report the error
        return None
    return dali.__version__


def environment() -> dict:
    import timm
    from machine import cpu_name  # benchmarks/ is on sys.path (see `import loaders`)

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "cuda": torch.version.cuda if gpu else None, "torch": torch.__version__,
            "dali": _dali_version(), "timm": timm.__version__,
            "python": platform.python_version(), "git_commit": commit}


def data_stats(shards: Path) -> dict:
    from shard_tools.manifest import samples

    rows = samples(shards)
    px = np.array([r.packed_width * r.packed_height for r in rows])
    by = np.array([r.packed_bytes for r in rows])
    sizes = {}
    for r in rows:
        k = f"{r.packed_width}x{r.packed_height}"
        sizes[k] = sizes.get(k, 0) + 1
    return {"images": len(rows), "bits_per_pixel": float((by * 8).sum() / px.sum()),
            "sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1]))}


def timed_build(src: str, out: Path, max_side: int = 0) -> dict:
    """kvasir-shard build of `src` into `out`, timed: the packing rate."""
    from shard_tools.build import BuildSpec, build

    t0 = time.perf_counter()
    result = build(BuildSpec(src=src, out=str(out), max_side=max_side))
    dt = time.perf_counter() - t0
    mb = sum(r.size for r in result.records) / 1e6  # every source file, packed or rejected
    return {"images_per_s": len(result.records) / dt, "mb_per_s": mb / dt,
            "workers": result.workers, "max_side": max_side}


def make_data(tmp: Path, per_class: int) -> tuple[Path, dict]:
    """A synthetic set packed into tmp/shards, and its packing rate."""
    from shard_tools.synth import synth

    synth(tmp / "src", per_class=per_class, seed=0)
    return tmp / "shards", timed_build(str(tmp / "src"), tmp / "shards")


def repack(shards: Path, out: Path, max_side: int = 0) -> dict:
    """Re-pack the source of `shards` (same seed and split) into `out`, timed."""
    from shard_tools.manifest import load

    return timed_build(load(shards).source, out, max_side)


@dataclass
class Data:
    """The shards every run of one invocation reads, and what packing them measured."""

    shards: Path
    small: Path | None = None  # the same images packed with --max-side
    res: dict = field(default_factory=dict)  # packing, data (+ _max_side): merged into results


def prepare_data(spec: BenchSpec, tmp: Path) -> Data:
    """The given shards, or a synthetic set packed into `tmp`; packing rates, data stats."""
    shards = Path(spec.shards) if spec.shards else None
    data = Data(shards or tmp / "shards")
    if shards is None:
        per_class = spec.per_class or (12 if spec.quick else 40)
        data.shards, data.res["packing"] = make_data(tmp, per_class)
    elif not spec.quick:
        data.res["packing"] = repack(shards, tmp / "repacked")
    data.res["data"] = data_stats(data.shards)
    if spec.max_side:  # the same images packed pre-downscaled: the CPU lever, as deployed
        data.small = tmp / f"shards-max{spec.max_side}"
        data.res["packing_max_side"] = repack(data.shards, data.small, spec.max_side)
        data.res["data_max_side"] = data_stats(data.small)
    return data


def factories(spec: BenchSpec, data: Data) -> dict[str, Callable[[int], Callable]]:
    """Loader name -> (threads -> (() -> a fresh loader))."""
    shards, b, s, m = data.shards, spec.batch_size, spec.image_size, spec.model
    make = {
        "dali-cpu": lambda w: (lambda: L.dali(shards, b, s, w, m)),
        "dali-gpu": lambda w: (lambda: L.dali(shards, b, s, w, m, "gpu")),
        "torch-pil": lambda w: (lambda: L.torch_pil(shards, b, s, w, m)),
        "wds-pil": lambda w: (lambda: L.wds_pil(shards, b, s, w, m)),
        "torch-nvjpeg": lambda w: (lambda: L.torch_nvjpeg(shards, b, s, w, m)),
    }
    if data.small:
        make[f"dali-cpu-max{spec.max_side}"] = lambda w: (lambda: L.dali(data.small, b, s, w, m))
    return make


def measure(label: str, fn: Callable[[], dict]) -> dict:
    """fn()'s figures, or {"error": ...} when it fails: one loader's failure (a missing
    library, a pipeline error) must not cost the others' figures."""
    print(f"{label} ...", flush=True)
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the results, shown in the table
        err = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        print(f"  {label} failed: {err}", flush=True)
        return {"error": err[:500]}
    finally:
        gc.collect()  # the loader's pipelines, threads and pinned buffers go before the next


def scaling(spec: BenchSpec, names: list[str], make: dict, cores: int) -> dict:
    """Loader-only images/sec of `spec.scaling_loaders` at each thread count."""
    threads = spec.scaling_threads or sorted({1, *range(2, cores + 1, max(1, cores // 4))})
    out: dict = {}
    for name in names:
        if spec.scaling_loaders is not None and name not in spec.scaling_loaders:
            continue
        out[name] = {}
        for w in threads:
            r = measure(f"scaling {name} x{w}", lambda: time_loader(make[name](w), spec))
            out[name][w] = r.get("images_per_s", r)
    return out


def run(spec: BenchSpec, data: Data | None = None) -> dict:
    if data is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run(spec, prepare_data(spec, Path(tmp)))
    cores = os.cpu_count() or 1
    workers = spec.workers or cores
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res: dict = {"spec": asdict(spec), "environment": environment(), "loader": {},
                 "full_step": {}, "scaling": {}, **data.res}
    make = factories(spec, data)
    extra = [f"dali-cpu-max{spec.max_side}"] if data.small else []
    gpu_only = ("dali-gpu", "torch-nvjpeg")
    names = [n for n in [*spec.loaders, *extra] if n not in gpu_only or device.type == "cuda"]
    for name in names if spec.loader_only else []:
        res["loader"][name] = measure(f"loader {name}",
                                      lambda: time_loader(make[name](workers), spec))
    res["model_only"] = measure("model only", lambda: time_model(spec, device))
    for name in names:
        if name.startswith("dali") and (name == "dali-gpu") != (device.type == "cuda"):
            continue  # the full step pairs the GPU model with the GPU loader
        res["full_step"][name] = measure(f"full step {name}", lambda: time_loader(
            make[name](workers), spec, model_step(spec, device)))
    if spec.inference:
        res["inference"] = measure("inference", lambda: time_inference(spec, device))
    if spec.scaling:
        res["scaling"] = scaling(spec, names, make, cores)
    return res


def _ok(r: dict) -> bool:
    return "error" not in r


def _row(mode: str, name: str, r: dict, base: float | None, model: float | None) -> str:
    if not _ok(r):
        return f"| {mode} | {name} | error: {r['error'][:160]} | | | | |"
    ratio = f"{r['images_per_s'] / base:.2f}x" if base and mode == "loader" else ""
    vs_model = f"{r['images_per_s'] / model:.2f}" if mode == "full_step" and model else ""
    wait = f"{100 * r['data_wait_share']:.0f}%" if "data_wait_share" in r else ""
    return (f"| {mode} | {name} | {r['images_per_s']:.1f} ({r['p10']:.1f}-{r['p90']:.1f}) | "
            f"{ratio} | {vs_model} | {wait} | {r['cpu_s_per_1000']:.1f} |")


def _notes(res: dict) -> list[str]:
    """Packing, inference and scaling lines under the table."""
    lines = []
    for key in ("packing", "packing_max_side"):
        if key in res:
            p = res[key]
            extra = f" with --max-side {p['max_side']}" if p.get("max_side") else ""
            lines.append(f"packing (kvasir-shard build{extra}): {p['images_per_s']:.0f} "
                         f"images/s, {p['mb_per_s']:.1f} MB/s on {p['workers']} workers")
    inference = res.get("inference", {})
    for name, r in ({"inference": inference} if not _ok(inference) else inference).items():
        lines.append(f"inference {name}: " + (
            f"{r['images_per_s']:.1f} images/s ({r['p10']:.1f}-{r['p90']:.1f}), batch "
            f"{res['spec']['batch_size']}" if _ok(r) else f"error: {r['error']}"))
    for name, s in res["scaling"].items():
        lines.append(f"scaling {name} (threads: images/s): " + ", ".join(
            f"{w}: {v:.0f}" if isinstance(v, float) else f"{w}: error {v['error']}"
            for w, v in s.items()))
    return lines


def table(res: dict) -> str:
    base = res["loader"].get("torch-pil", {}).get("images_per_s")
    m = res["model_only"]
    model = m.get("images_per_s")
    env = res["environment"]
    lines = [f"{env['cpu']}, {env['cores']} cores, GPU {env['gpu']}; data "
             f"{res['data']['images']} images at {res['data']['bits_per_pixel']:.2f} bits/px; "
             f"{res['spec']['model']}, batch {res['spec']['batch_size']}, "
             f"{res['spec']['image_size']} px",
             "", "| mode | loader | images/s (p10-p90) | vs torch-pil | vs model-only | "
             "data wait | CPU s/1000 img |", "|---|---|---|---|---|---|---|"]
    for mode in ("loader", "full_step"):
        lines += [_row(mode, name, r, base, model) for name, r in res[mode].items()]
    if _ok(m):
        lines.append(f"| model_only | {res['spec']['model']} | {m['images_per_s']:.1f} "
                     f"({m['p10']:.1f}-{m['p90']:.1f}) | | 1.00 | | {m['cpu_s_per_1000']:.1f} |")
    else:
        lines.append(_row("model_only", res["spec"]["model"], m, None, None))
    return "\n".join(lines + _notes(res))


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{k}\n(loader)", v["images_per_s"]) for k, v in res["loader"].items() if _ok(v)]
    bars += [(f"{k}\n(full step)", v["images_per_s"]) for k, v in res["full_step"].items()
             if _ok(v)]
    if _ok(res["model_only"]):
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


def parse(argv: list[str] | None) -> list[BenchSpec]:
    """One BenchSpec per (model, batch size) asked for."""
    d = BenchSpec()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="shards folder (default: build a synthetic set)")
    p.add_argument("--loaders", nargs="+", default=None, choices=LOADERS)
    p.add_argument("--batch-size", type=int, nargs="+", default=[d.batch_size])
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--model", nargs="+", default=[d.model])
    p.add_argument("--batches", type=int, default=d.batches)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--workers", type=int, default=0, help="threads/workers (0: all cores)")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--scaling-threads", type=int, nargs="+", default=None,
                   help="thread counts for the scaling block (default: 1 up to all cores)")
    p.add_argument("--scaling-loaders", nargs="+", default=None, choices=LOADERS,
                   help="loaders for the scaling block (default: all timed)")
    p.add_argument("--no-inference", action="store_true")
    p.add_argument("--per-class", type=int, default=0,
                   help="synthetic set: images per class (default 40, 12 with --quick)")
    p.add_argument("--max-side", type=int, default=0,
                   help="also time dali-cpu on shards re-packed with this --max-side")
    p.add_argument("--quick", action="store_true", help="a run of under two minutes on 2 cores")
    p.add_argument("--out", default=d.out)
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    specs = []
    for model in a.model:
        for batch in a.batch_size:
            spec = BenchSpec(
                shards=a.shards, batch_size=batch, image_size=a.image_size, model=model,
                batches=a.batches, warmup=a.warmup, repeats=a.repeats, workers=a.workers,
                # Loader-only figures do not depend on the model: the first model's runs
                # time them (and their thread scaling), the others the model and full step.
                loader_only=model == a.model[0], scaling=not a.no_scaling and model == a.model[0],
                scaling_threads=a.scaling_threads, scaling_loaders=a.scaling_loaders,
                inference=not a.no_inference, quick=a.quick, out=a.out, max_side=a.max_side,
                per_class=a.per_class,
                loaders=a.loaders or (["dali-gpu", "torch-nvjpeg"] if gpu else []) + d.loaders)
            if a.quick:
                spec.batch_size, spec.batches, spec.repeats, spec.warmup = 8, 2, 2, 1
                spec.image_size = min(spec.image_size, 224)
                spec.scaling = False
            specs.append(spec)
    return specs


def write(results: list[dict], spec: BenchSpec, sweep: bool) -> Path:
    """JSON and table (and chart for a single run) named by the environment; the path stem."""
    env = results[0]["environment"]
    name = "-".join(str(x) for x in (env["cpu"].split("@")[0].strip(), f"{env['cores']}c",
                                     env["gpu"] or "nogpu", "quick" if spec.quick else "full"))
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) + (
        "-sweep" if sweep else "")
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "runs": results} if sweep else results[0]
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n\n".join(table(r) for r in results) + "\n")
    if not sweep:
        chart(results[0], out / f"{name}.png")
    return out / name


def main(argv: list[str] | None = None) -> dict:
    specs = parse(argv)
    sweep = len(specs) > 1
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(specs[0], Path(tmp))
        for spec in specs:
            print(f"== {spec.model}, batch {spec.batch_size}, {spec.image_size} px", flush=True)
            results.append(run(spec, data))
            path = write(results, spec, sweep)  # after every run: a timeout keeps the rest
    print("\n\n".join(table(r) for r in results))
    print(f"\nwrote {path}.json, .md" + ("" if sweep else " and .png"))
    return {"environment": results[0]["environment"], "runs": results} if sweep else results[0]


if __name__ == "__main__":
    main()
