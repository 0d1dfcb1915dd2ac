"""How kvasir-shard and the DALI training loader grow with the number of images N.

    python benchmarks/scale.py [--old DIR] [--quick] [--work DIR] [--repeats 2]

Steps, each point in a fresh subprocess:
  build   shard_tools.build.build of a source of N images (all cores' workers)
  verify  shard_tools.verify.verify of those shards
  eda     shard_tools.eda.eda of the source
  loader  one epoch of the DALI CPU training graph over the train split: ShardSet.open(root)
          .files("train") (its SHA-256 check runs cold: a fresh KVASIR_CACHE_DIR), DaliLoader
          with PipeSpec(train=True, device="cpu", image_size=64, batch_size=64, num_threads=2)
          and its default bounded shuffle buffer
  dup     shard_tools.split.duplicate_groups alone, on the perceptual hashes
          (shard_tools.imagecheck.phash) of the first N generated tiny images
Two data sets, 8 class folders each: `tiny`, shard_tools.synth.render frames at 64x64 (1.4 ms
each, where a full-size frame takes 300: the same scenes, so their perceptual hashes are as
alike as the full-size frames'; 1% near and 0.4% exact duplicates planted): the cost per item;
`bytes`, shard_tools.synth frames (Kvasir's resolutions, 720x576 to 1920x1072, about 3 bits per
pixel): the cost per byte. Smaller N are hard-linked subsets of the largest.

Time: wall clock around the call inside the subprocess (interpreter start and imports
excluded). Memory: VmHWM of the step's process (/proc/self/status) and ru_maxrss of its
largest finished worker (RUSAGE_CHILDREN; a forked worker's figure includes the pages it
shares with its parent at fork). ru_maxrss of the process itself is not used: Linux carries a
parent's over into a child at fork and exec.

`--old DIR`: the same steps on a checkout of the previous version (its loader is
`kvasir_dali.data.DaliLoader` with shuffle_buffer = the split size, as its DataModule set it).
Growth exponents: slope of log(time) and of log(peak) against log(N), least squares over all N
and between the last two N. Writes benchmarks/results/scale-<cpu>-<cores>c.json, .md, .png
(rewritten after every point, so a timeout keeps what was measured).

The data sets are made in scale_data.py, each step runs in scale_steps.py (inside the
subprocess) and the results files are written by scale_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from machine import cpu_name
from scale_data import SETS, candidate_pairs, prepare
from scale_report import SET_TITLES, markdown, replot, write_figures, write_json
from scale_steps import SOURCE_STEPS, STEPS, run_step

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class BenchSpec:
    tiny_n: list[int] = field(default_factory=lambda: [1000, 4000, 16000, 64000])
    bytes_per_class: list[int] = field(default_factory=lambda: [20, 40, 80, 160, 320, 1000])
    dup_n: list[int] = field(default_factory=lambda: [8000, 32000, 64000])
    sets: list[str] = field(default_factory=lambda: ["tiny", "bytes"])
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    old: str = ""  # checkout of the previous version; "" = the new code only
    batch_size: int = 64
    image_size: int = 64
    threads: int = 2  # DALI threads
    workers: int = 0  # build/eda worker processes (0: all cores)
    repeats: int = 1  # runs per point: the fastest is kept, the highest peak
    timeout_s: int = 1800  # per subprocess
    work: str = ""  # data sets kept here between runs ("" = a temporary folder)
    out: str = str(RESULTS)
    quick: bool = False
    replot: str = ""  # a results JSON: rewrite its .md and .png only, measure nothing
    append: bool = False  # keep the rows of an existing results file this run does not redo

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass
class Run:
    """One benchmark run: its options, folders, the code versions and the growing document."""

    spec: BenchSpec
    work: Path
    codes: dict[str, Path]  # "old"/"new" -> checkout root
    doc: dict
    stem: Path  # results path without suffix

    def save(self, figures: bool = False) -> None:
        """The JSON after every point (a timeout keeps what was measured); .md and .png too
        after every N."""
        self.doc["environment"]["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
        write_json(self.doc, self.stem.with_suffix(".json"))
        if figures:
            write_figures(self.doc, self.stem)


# ---- one point: a step in a fresh interpreter, repeated ----------------------------------
def _launch(run: Run, a: dict, root: Path) -> dict:
    """One step in a fresh interpreter with PYTHONPATH=root: its result, or {'error': ...}."""
    result = run.work / "result.json"
    result.unlink(missing_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="shard-check-cache-", dir=run.work))
    env = dict(os.environ, PYTHONPATH=str(root), KVASIR_CACHE_DIR=str(cache))
    args = json.dumps(a | {"root": str(root), "result": str(result)})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-step", args]
    # Its own session, so that a timeout stops its worker processes too.
    with subprocess.Popen(cmd, cwd=run.work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as p:
        try:
            output = p.communicate(timeout=run.spec.timeout_s)[0]
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            return {"error": f"timed out after {run.spec.timeout_s} s"}
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    if p.returncode or not result.is_file():
        lines = [x.strip() for x in output.replace("\r", "\n").splitlines()]
        return {"error": f"exit {p.returncode}: " + " | ".join([x for x in lines if x][-3:])}
    return json.loads(result.read_text())


def measure(run: Run, a: dict) -> dict:
    """`repeats` runs of one point: the fastest time, the highest peaks, every time."""
    runs = [_launch(run, a, run.codes[a["code"]]) for _ in range(run.spec.repeats)]
    ok = [r for r in runs if "error" not in r]
    row = {"set": a["set"], "step": a["step"], "code": a["code"], "n": a["n"]}
    point = f"  {a['set']:5} N={a['n']:<6} {a['code']} {a['step']:6}"
    if not ok:
        row["error"] = runs[-1]["error"]
        print(f"{point} FAILED {row['error']}", flush=True)
        return row
    best = min(ok, key=lambda r: r["seconds"])
    row |= best | {"times": [round(r["seconds"], 3) for r in ok],
                   "peak_self_mb": max(r["peak_self_mb"] for r in ok),
                   "peak_workers_mb": max(r["peak_workers_mb"] for r in ok)}
    # What the work itself added to the process: its peak above the after-import baseline.
    row["work_peak_mb"] = round(max(row["peak_self_mb"] - row["baseline_mb"], 1.0), 1)
    extra = f", {row['images_per_s']:.0f} img/s" if "images_per_s" in row else ""
    print(f"{point} {row['seconds']:8.2f} s  peak {row['peak_self_mb']:5.0f} MiB "
          f"(+{row['work_peak_mb']:.0f} over imports; workers {row['peak_workers_mb']:.0f})"
          f"{extra}", flush=True)
    return row


def _point_args(run: Run, set_name: str, n: int, src: Path, code: str) -> dict:
    s = run.spec
    return {"set": set_name, "n": n, "code": code, "src": str(src),
            "shards": str(run.work / f"shards-{code}-{set_name}-{n}"),
            "eda_out": str(run.work / f"eda-{code}-{set_name}-{n}"),
            "workers": s.worker_count(), "batch_size": s.batch_size,
            "image_size": s.image_size, "threads": s.threads}


def run_set(run: Run, set_name: str, sources: list[tuple[int, Path]]) -> None:
    """Every step of one data set at every N, old and new side by side at each N."""
    steps = [x for x in SOURCE_STEPS if x in run.spec.steps]
    for n, src in sources:
        for code in run.codes:
            a = _point_args(run, set_name, n, src, code)
            for step in steps:
                run.doc["rows"].append(measure(run, a | {"step": step}))
                run.save()
            shutil.rmtree(a["shards"], ignore_errors=True)
            shutil.rmtree(a["eda_out"], ignore_errors=True)
        run.save(figures=True)


def run_dup(run: Run, hashes: Path) -> None:
    """duplicate_groups alone on the first N hashes; with the pair counts that explain it."""
    rows = json.loads(hashes.read_text())
    for n in run.spec.dup_n:
        pairs = {"all_pairs": n * (n - 1) // 2,
                 "block_pairs": candidate_pairs([r["phash"] for r in rows[:n]])}
        print(f"  tiny  N={n:<6} pairs: {pairs['all_pairs']:,} in all, "
              f"{pairs['block_pairs']:,} sharing a hash block", flush=True)
        for code in run.codes:
            a = {"set": "tiny", "step": "dup", "n": n, "code": code, "hashes": str(hashes)}
            run.doc["rows"].append(measure(run, a) | pairs)
            run.save()
    run.save(figures=True)


# ---- where and on what it ran ------------------------------------------------------------
def _git_commit(root: Path) -> str:
    if not (root / ".git").exists():  # e.g. a `git archive` copy: no commit to name
        return ""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                              capture_output=True, text=True, cwd=root, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _version(*names: str) -> str | None:
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if any(name == n or name.startswith(n + "-") for n in names):
            return dist.version
    return None


def environment(codes: dict[str, Path]) -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "pillow": _version("pillow"),
            "dali": _version("nvidia-dali"), "torch": _version("torch"),
            "git_commit": {code: _git_commit(root) for code, root in codes.items()},
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def result_stem(env: dict, spec: BenchSpec) -> Path:
    """benchmarks/results/scale-<cpu>-<cores>c[-quick], named like throughput.py's files."""
    name = f"scale-{env['cpu'].split('@')[0].strip()}-{env['cores']}c" + (
        "-quick" if spec.quick else "")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    return out / name


# ---- command line and the run ------------------------------------------------------------
def parse(argv: list[str] | None) -> BenchSpec:
    d = BenchSpec()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", default="", help="checkout of the previous version to compare "
                   "(e.g. `git worktree add /tmp/old 742a8a4`); default: new code only")
    p.add_argument("--tiny-n", type=int, nargs="+", default=d.tiny_n)
    p.add_argument("--bytes-per-class", type=int, nargs="+", default=d.bytes_per_class)
    p.add_argument("--dup-n", type=int, nargs="+", default=d.dup_n)
    p.add_argument("--sets", nargs="+", choices=SETS, default=d.sets)
    p.add_argument("--steps", nargs="+", choices=STEPS, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--timeout", type=int, default=d.timeout_s, help="seconds per subprocess")
    p.add_argument("--work", default="", help="keep the generated data sets here for reuse")
    p.add_argument("--out", default=d.out)
    p.add_argument("--quick", action="store_true", help="tiny sizes: keeps the script working")
    p.add_argument("--replot", default="", help="a results .json: rewrite its .md and .png")
    p.add_argument("--append", action="store_true", help="keep the (set, step) rows of the "
                   "existing results file that this run does not measure")
    a = p.parse_args(argv)
    spec = BenchSpec(tiny_n=sorted(a.tiny_n), bytes_per_class=sorted(a.bytes_per_class),
                     dup_n=sorted(a.dup_n), sets=a.sets, steps=a.steps, old=a.old,
                     batch_size=a.batch_size, workers=a.workers, repeats=max(1, a.repeats),
                     timeout_s=a.timeout, work=a.work, out=a.out, quick=a.quick,
                     replot=a.replot, append=a.append)
    if a.quick:
        spec.tiny_n, spec.bytes_per_class, spec.dup_n = [96, 192], [2, 4], [400, 800]
        spec.batch_size = 8
    if {"verify", "loader"} & set(spec.steps) and "build" not in spec.steps:
        spec.steps.append("build")  # they read the shards it writes
    return spec


SHARED_NOTE = ("The {cores} cores {shared} (load average {load} at the start): each point is "
               "measured {repeats} time(s) in a fresh process, the fastest kept; read "
               "differences under about 20% as noise.")


def keep_earlier(run: Run) -> None:
    """--append: take over the rows of the existing results file whose (set, step) this run
    does not measure, with that run's environment and hash statistics."""
    path, s = run.stem.with_suffix(".json"), run.spec
    if not s.append or not path.is_file():
        return
    earlier = json.loads(path.read_text())
    redo = {(x, st) for x in s.sets for st in SOURCE_STEPS if st in s.steps}
    redo |= {("tiny", "dup")} if "dup" in s.steps else set()
    run.doc["rows"] = [r for r in earlier["rows"] if (r["set"], r["step"]) not in redo]
    kept = sorted({f"{r['set']} {r['step']}" for r in run.doc["rows"]})
    run.doc["earlier_run"] = {"kept": kept, "environment": earlier["environment"],
                              "note": earlier.get("note", "")}
    if "hash_realism" in earlier:
        run.doc["hash_realism"] = earlier["hash_realism"]
    print(f"kept from {path.name}: {', '.join(kept) or 'nothing'}", flush=True)


def bench(spec: BenchSpec, work: Path) -> None:
    codes = ({"old": Path(spec.old).resolve()} if spec.old else {}) | {"new": ROOT}
    env = environment(codes)
    load = env["load_average_at_start"]
    shared = "are shared with other work while this runs" if load[0] > 0.5 else \
        "were nearly idle at the start, but nothing stops other work from sharing them"
    note = SHARED_NOTE.format(cores=env["cores"], shared=shared, load=load,
                              repeats=spec.repeats)
    print(note, flush=True)
    run = Run(spec, work, codes, {"environment": env, "spec": asdict(spec), "note": note,
                                  "rows": []}, result_stem(env, spec))
    keep_earlier(run)
    print("preparing the data sets", flush=True)
    sources, hashes, realism = prepare(spec, work)
    if realism is not None:
        run.doc["hash_realism"] = realism
    for set_name, points in sources.items():
        print(f"== {SET_TITLES[set_name]}", flush=True)
        run_set(run, set_name, points)
    if hashes is not None:
        print("== near-duplicate search alone (duplicate_groups)", flush=True)
        run_dup(run, hashes)
    run.save(figures=True)
    print(markdown(run.doc))
    print(f"wrote {run.stem}.json, .md and .png")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-step"]:  # the subprocess side, started by _launch
        run_step(json.loads(argv[1]))
        return
    sys.path.insert(0, str(ROOT))  # the driver itself uses this checkout's shard_tools
    spec = parse(argv)
    if spec.replot:
        replot(Path(spec.replot))
    elif spec.work:
        Path(spec.work).mkdir(parents=True, exist_ok=True)
        bench(spec, Path(spec.work).resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="kvasir-scale-") as tmp:
            bench(spec, Path(tmp))


if __name__ == "__main__":
    main()
