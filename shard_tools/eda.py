"""`kvasir-shard eda SRC --out DIR`: what is in a Kvasir-layout folder or zip, before packing.

Every file is fully decoded once (in parallel) for its size, mode, bits per pixel, per-channel
256-bin histograms (from which the mean and std are exact) and `build`'s verdict (packed as is,
converted, or rejected with the reason). Histograms are summed per class as results arrive, so
memory does not grow with the number of files. Writes eda.json, eda.md and three pictures:
grid.png (a few images of every class), resolutions.png, colours.png.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .imagecheck import inspect_image
from .parallel import pool_map, worker_source
from .source import DEFAULT_MAX_FILE_MB, ReadError, Source, open_source

GRID_PER_CLASS = 6
THUMB = 160  # pixels, longer side of a grid thumbnail


@dataclass
class FileStats:
    rel: str
    cls: str | None
    size: int  # bytes
    ok: bool = False
    error: str = ""
    width: int = 0
    height: int = 0
    fmt: str = ""
    mode: str = ""
    convert: list[str] | None = None  # build's conversion reasons
    hist: np.ndarray | None = None  # (3, 256) pixel counts per RGB channel, displayed image
    thumb: Image.Image | None = None  # for the grid, made from the same decode


def _stats_job(job: tuple[str, str | None, int, bool]) -> FileStats:
    rel, cls, size, want_thumb = job
    st = FileStats(rel, cls, size)
    try:
        v, shown = inspect_image(worker_source().read(rel))
    except ReadError as exc:
        st.error = str(exc)
        return st
    st.ok, st.error, st.width, st.height = v.ok, v.error, v.width, v.height
    st.fmt, st.mode, st.convert = v.fmt, v.mode, v.reasons
    if shown is not None:
        shown = shown.convert("RGB")
        rgb = np.asarray(shown)
        st.hist = np.stack([np.bincount(rgb[..., c].ravel(), minlength=256) for c in range(3)])
        if want_thumb:
            shown.thumbnail((THUMB, THUMB))
            st.thumb = shown
    return st


def _mean_std(hist: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of [0, 1] pixels from (3, 256) counts."""
    v = np.arange(256) / 255.0
    n = hist.sum(1)
    mean = (hist * v).sum(1) / n
    var = (hist * v**2).sum(1) / n - mean**2
    return mean.round(4).tolist(), np.sqrt(np.maximum(var, 0)).round(4).tolist()


def _summary(x: list[float]) -> dict:
    a = np.array(x, float)
    return {"min": float(a.min()), "median": float(np.median(a)), "mean": float(a.mean()),
            "max": float(a.max())} if len(a) else {}


def analyse(source: Source, workers: int = 0) -> tuple[dict, list[FileStats], dict]:
    """eda.json's content, the per-file statistics (histograms dropped) and each class's
    (3, 256) histogram."""
    files = source.files()
    classes = source.classes()
    hists = {c: np.zeros((3, 256), np.int64) for c in classes}
    stats = []
    seen: Counter = Counter()
    jobs = []
    for f in files:
        if f.cls is not None:
            seen[f.cls] += 1  # thumbnails of the first few files of each class: the grid
            jobs.append((f.rel, f.cls, f.size, seen[f.cls] <= 2 * GRID_PER_CLASS))
    with pool_map(_stats_job, jobs, source, workers or os.cpu_count() or 1, "eda") as results:
        for st in results:
            if st.hist is not None:
                hists[st.cls] += st.hist
                st.hist = None  # summed: keep memory flat in the number of files
            stats.append(st)
    good = [s for s in stats if s.ok]
    res = Counter(f"{s.width}x{s.height}" for s in good)
    per_class = {}
    for c in classes:
        mine = [s for s in good if s.cls == c]
        m, sd = _mean_std(hists[c]) if mine else ([], [])
        per_class[c] = {"images": len(mine), "rejected": sum(1 for s in stats if s.cls == c
                                                              and not s.ok),
                        "mean": m, "std": sd,
                        "resolutions": dict(Counter(f"{s.width}x{s.height}" for s in mine)
                                            .most_common())}
    total = sum(hists.values(), np.zeros((3, 256), np.int64))
    mean, std = _mean_std(total) if good else ([], [])
    out = {
        "source": str(source.origin), "files": len(files), "images": len(good),
        "classes": {c: per_class[c]["images"] for c in classes},
        "resolutions": [{"size": k, "count": n} for k, n in res.most_common()],
        "modes": dict(Counter(s.mode for s in good).most_common()),
        "formats": dict(Counter(s.fmt for s in good).most_common()),
        "channels": dict(Counter(str(Image.getmodebands(s.mode)) for s in good)),
        "file_bytes": _summary([s.size for s in good]),
        "bits_per_pixel": _summary([8 * s.size / (s.width * s.height) for s in good]),
        "mean": mean, "std": std,  # of [0, 1] RGB pixels: usable as normalization constants
        "per_class": per_class,
        "would_convert": dict(Counter(r for s in good for r in s.convert).most_common()),
        "would_reject": [{"path": s.rel, "reason": s.error} for s in stats if not s.ok]
        + [{"path": f.rel, "reason": f.reject} for f in files if f.cls is None],
    }
    return out, stats, hists


def markdown(e: dict) -> str:
    lines = [f"# EDA of {e['source']}", "",
             f"{e['files']} files, {e['images']} decodable images in {len(e['classes'])} "
             f"classes; {len(e['would_reject'])} would be rejected by `kvasir-shard build`.", "",
             "| Class | Images | Rejected | Mean RGB | Std RGB |", "|---|---|---|---|---|"]
    for c, p in e["per_class"].items():
        lines.append(f"| {c} | {p['images']} | {p['rejected']} | {p['mean']} | {p['std']} |")
    lines += ["", f"All images: mean {e['mean']}, std {e['std']} (RGB, pixels in [0, 1]).", "",
              "| Resolution | Images |", "|---|---|"]
    lines += [f"| {r['size']} | {r['count']} |" for r in e["resolutions"]]
    fb, bpp = e["file_bytes"], e["bits_per_pixel"]
    if fb:
        lines += ["", f"File size: median {fb['median'] / 1e3:.0f} KB (min {fb['min'] / 1e3:.0f},"
                  f" max {fb['max'] / 1e3:.0f}); bits per pixel: median {bpp['median']:.2f} "
                  f"(min {bpp['min']:.2f}, max {bpp['max']:.2f}).",
                  f"Colour modes: {e['modes']}; formats: {e['formats']}; channels: "
                  f"{e['channels']}."]
    if e["would_convert"]:
        lines += ["", "Would be converted to baseline RGB JPEG:", ""]
        lines += [f"- {n} x {r}" for r, n in e["would_convert"].items()]
    if e["would_reject"]:
        lines += ["", "Would be rejected:", ""]
        lines += [f"- `{r['path']}`: {r['reason']}" for r in e["would_reject"]]
    return "\n".join(lines) + "\n"


def eda(src: str, out: str | Path, workers: int = 0,
        max_file_mb: float = DEFAULT_MAX_FILE_MB) -> dict:
    """Analyse `src` and write eda.json, eda.md and the pictures into `out`."""
    from . import eda_plots

    source = open_source(src, max_file_mb)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    e, stats, hists = analyse(source, workers)
    (out / "eda.json").write_text(json.dumps(e, indent=2) + "\n")
    (out / "eda.md").write_text(markdown(e))
    thumbs = {c: [s.thumb for s in stats if s.ok and s.cls == c and s.thumb][:GRID_PER_CLASS]
              for c in e["classes"]}
    eda_plots.grid_png(out / "grid.png", thumbs)
    eda_plots.resolutions_png(out / "resolutions.png", e)
    eda_plots.colours_png(out / "colours.png", hists)
    return e
