"""The subprocess side of benchmarks/scale.py: one step, timed and its memory peaks read.

scale.py starts `scale.py --run-step JSON` with PYTHONPATH = the checkout under test (old or
new), so every import of shard_tools / kvasir_dali here stays inside a function: at module
level it would load the driver's code instead of the code being measured.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from pathlib import Path

STEPS = ("build", "verify", "eda", "loader", "dup")  # also the order of the tables' rows
WORKER_STEPS = ("build", "eda")  # the steps with worker processes
SOURCE_STEPS = ("build", "verify", "eda", "loader")  # per data set; `dup` runs on hashes
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _status_mb(*fields: str) -> dict[str, float]:
    """Fields of /proc/self/status (VmHWM, RssAnon, RssFile...) in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


def _peaks(step: str) -> dict:
    """VmHWM of this process and ru_maxrss of its largest finished child, in MiB. Only build
    and eda have workers; other steps' children are helpers (importing DALI runs
    `ldconfig -p`) whose ru_maxrss is the parent's carried over, so it is kept apart."""
    hwm = _status_mb("VmHWM")["VmHWM"]
    children = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    if step in WORKER_STEPS:
        return {"peak_self_mb": hwm, "peak_workers_mb": children}
    return {"peak_self_mb": hwm, "peak_workers_mb": 0.0, "helper_children_mb": children}


def _started() -> tuple[float, float]:
    """(VmHWM after the imports: the step's baseline, the clock) just before the work."""
    return _status_mb("VmHWM")["VmHWM"], time.perf_counter()


def _step_build(a: dict) -> dict:
    from shard_tools.build import BuildSpec, build

    base, t0 = _started()
    res = build(BuildSpec(src=a["src"], out=a["shards"], workers=a["workers"], overwrite=True))
    seconds = time.perf_counter() - t0
    if isinstance(res, dict):  # the old build returns its manifest
        groups = res["duplicate_groups"]
        packed = sum(s["count"] for s in res["splits"].values())
    else:
        groups, packed = res.manifest.duplicate_groups, res.packed
    return {"seconds": seconds, "baseline_mb": base, "packed": packed,
            "duplicate_groups": len(groups)}


def _step_verify(a: dict) -> dict:
    from shard_tools.verify import verify

    base, t0 = _started()
    errors = verify(a["shards"])
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"verify found {len(errors)} problems: {errors[:3]}")
    shards = sum(1 for _ in Path(a["shards"]).glob("*/*.tar"))
    return {"seconds": seconds, "baseline_mb": base, "shards": shards}


def _step_eda(a: dict) -> dict:
    from shard_tools.eda import eda

    base, t0 = _started()
    e = eda(a["src"], a["eda_out"], workers=a["workers"])
    return {"seconds": time.perf_counter() - t0, "baseline_mb": base, "images": e["images"]}


def _step_loader(a: dict) -> dict:
    from kvasir_dali.pipeline import PipeSpec
    from kvasir_dali.shards import ShardSet

    if a["code"] == "old":  # the old DataModule: a shuffle buffer as large as the split
        from kvasir_dali.data import DaliLoader
    else:
        from kvasir_dali.loader import DaliLoader
    base, t0 = _started()
    files = ShardSet.open(a["shards"]).files("train")
    extra = {"shuffle_buffer": files.count} if a["code"] == "old" else {}
    spec = PipeSpec(tars=files.tars, indexes=files.indexes, batch_size=a["batch_size"],
                    image_size=a["image_size"], mean=MEAN, std=STD, train=True, device="cpu",
                    num_threads=a["threads"], **extra)
    loader = DaliLoader(spec)
    t1 = time.perf_counter()
    images = sum(len(labels) for _, labels in loader)
    t2 = time.perf_counter()
    if images != len(loader) * a["batch_size"] or not images:
        raise RuntimeError(f"one epoch gave {images} images in {len(loader)} batches")
    rss = _status_mb("RssAnon", "RssFile")  # the pipeline still alive: what its RSS is made of
    return {"seconds": t2 - t0, "baseline_mb": base, "setup_s": t1 - t0, "epoch_s": t2 - t1,
            "images": images, "split": files.count, "shuffle_buffer": spec.shuffle_buffer,
            "images_per_s": images / (t2 - t1), "rss_anon_end_mb": rss["RssAnon"],
            "rss_file_end_mb": rss["RssFile"]}


def _step_dup(a: dict) -> dict:
    from shard_tools.split import Item, duplicate_groups

    rows = json.loads(Path(a["hashes"]).read_text())[: a["n"]]
    items = [Item(r["rel"], r["cls"], r["sha256"], r["phash"]) for r in rows]
    base, t0 = _started()
    groups = duplicate_groups(items)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "baseline_mb": base, "groups": len(groups),
            "grouped": sum(len(g) for g in groups)}


_STEP_FUNCS: dict[str, Callable[[dict], dict]] = {
    "build": _step_build, "verify": _step_verify, "eda": _step_eda, "loader": _step_loader,
    "dup": _step_dup}


def run_step(a: dict) -> None:
    """Run one step on the code at a['root'], write its result file."""
    import shard_tools

    where = Path(shard_tools.__file__).resolve()
    if not where.is_relative_to(Path(a["root"]).resolve()):
        raise RuntimeError(f"shard_tools came from {where}, not from {a['root']}")
    res = _STEP_FUNCS[a["step"]](a)
    Path(a["result"]).write_text(json.dumps(res | _peaks(a["step"])))
