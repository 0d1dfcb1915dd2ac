"""benchmarks/scale.py's results files from its measurements: growth exponents (in the
JSON), the markdown tables and notes (.md), the log-log chart (.png).

Everything here reads the results document only, so `scale.py --replot` can redo the .md and
.png of an earlier run without measuring anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scale_data import SETS
from scale_steps import STEPS

MIN_FIT_MB = 5.0  # memory above the imports below this is noise: no exponent fitted to it
SET_TITLES = {"tiny": "tiny set: 64x64 JPEGs, 8 classes (cost per item)",
              "bytes": "bytes set: shard_tools.synth frames, 720x576..1920x1072 (cost per byte)"}
STEP_COLOURS = {"build": "tab:blue", "verify": "tab:orange", "eda": "tab:green",
                "loader": "tab:red", "dup": "tab:purple"}


# ---- growth exponents ----------------------------------------------------------------------
def _slopes(ns: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of log(y) on log(n), and the slope between the last two points."""
    lx, ly = np.log(ns), np.log(ys)
    return (round(float(np.polyfit(lx, ly, 1)[0]), 3),
            round(float((ly[-1] - ly[-2]) / (lx[-1] - lx[-2])), 3))


def exponents(rows: list[dict]) -> list[dict]:
    """Growth exponents per (set, step, code) with two or more measured N."""
    out = []
    keys = sorted({(r["set"], r["step"], r["code"]) for r in rows})
    for set_name, step, code in keys:
        pts = sorted((r["n"], r) for r in rows if (r["set"], r["step"], r["code"]) ==
                     (set_name, step, code) and "error" not in r)
        if len(pts) < 2:
            continue
        ns = [n for n, _ in pts]
        e = {"set": set_name, "step": step, "code": code, "n": [ns[0], ns[-1]]}
        for what, key in (("time", "seconds"), ("peak", "peak_self_mb"),
                          ("work_peak", "work_peak_mb"), ("peak_workers", "peak_workers_mb")):
            ys = [r[key] for _, r in pts]
            if min(ys) >= (MIN_FIT_MB if what == "work_peak" else 1e-9):
                e[f"{what}_exp"], e[f"{what}_exp_last"] = _slopes(ns, ys)
        e["peak_growth_mb"] = round(pts[-1][1]["peak_self_mb"] - pts[0][1]["peak_self_mb"], 1)
        out.append(e)
    return out


# ---- the markdown ----------------------------------------------------------------------------
def _row(rows: list[dict], set_name: str, step: str, code: str, n: int) -> dict | None:
    for r in rows:
        if (r["set"], r["step"], r["code"], r["n"]) == (set_name, step, code, n):
            return r
    return None


def _cell(r: dict | None, key: str, fmt: str) -> str:
    if r is None:
        return "-"
    return "error" if "error" in r else format(r[key], fmt)


def _peak_cell(r: dict | None) -> str:
    if r is None or "error" in r:
        return _cell(r, "", "")
    return f"{r['peak_self_mb']:.0f} (+{r['work_peak_mb']:.0f})"


def _set_table(rows: list[dict], set_name: str, codes: list[str]) -> list[str]:
    head = ["step", "N"] + [f"{c} s" for c in codes] + (["new/old"] if len(codes) == 2 else [])
    head += [f"{c} peak MiB (+work)" for c in codes] + [f"{c} worker MiB" for c in codes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in STEPS:
        for n in sorted({r["n"] for r in rows if (r["set"], r["step"]) == (set_name, step)}):
            got = [_row(rows, set_name, step, c, n) for c in codes]
            cells = [step, str(n)] + [_cell(r, "seconds", ".2f") for r in got]
            if len(codes) == 2:
                ok = all(r and "error" not in r for r in got)
                cells.append(f"{got[1]['seconds'] / got[0]['seconds']:.2f}x" if ok else "-")
            cells += [_peak_cell(r) for r in got]
            cells += [_cell(r, "peak_workers_mb", ".0f") for r in got]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _exponent_table(doc: dict) -> list[str]:
    lines = ["| set | step | code | N | time (all N; last pair) | peak (all N; last pair) | "
             "peak above imports (all N; last pair) | peak growth MiB |",
             "|---|---|---|---|---|---|---|---|"]

    def pair(e: dict, what: str) -> str:
        return f"{e[what + '_exp']:.2f}; {e[what + '_exp_last']:.2f}" if what + "_exp" in e \
            else "-"

    for e in doc["exponents"]:
        lines.append(f"| {e['set']} | {e['step']} | {e['code']} | {e['n'][0]}-{e['n'][1]} | "
                     f"{pair(e, 'time')} | {pair(e, 'peak')} | {pair(e, 'work_peak')} | "
                     f"{e['peak_growth_mb']:+.0f} |")
    return lines


def _commits(env: dict) -> str:
    return ", ".join(f"{c} {h}" for c, h in env["git_commit"].items())


def _header(doc: dict) -> list[str]:
    env = doc["environment"]
    lines = ["# Scaling with N: kvasir-shard build, verify, eda; the DALI CPU training loader; "
             "the near-duplicate search", "",
             f"{env['cpu']}, {env['cores']} cores (the loader runs DALI's CPU graph); Python "
             f"{env['python']}, DALI {env['dali']}; code {_commits(env)}.", "", doc["note"], ""]
    if "earlier_run" in doc:
        e = doc["earlier_run"]
        lines += [f"Kept from an earlier run (code {_commits(e['environment'])}, load "
                  f"average {e['environment']['load_average_at_start']} at its start): "
                  f"{', '.join(e['kept'])}.", ""]
    return lines + [
        "Time: seconds of the call itself. Peak: VmHWM of the step's process, and in brackets "
        "how far above its VmHWM after the imports (the work's own memory); worker: ru_maxrss "
        "of its largest finished worker (includes the pages it shares with its parent). Only "
        "build and eda have workers.", ""]


def _dup_notes(doc: dict) -> list[str]:
    """Why the search costs what it costs: pairs compared, and how alike the hashes are."""
    lines = []
    for r in doc["rows"]:
        if r["step"] == "dup" and r["code"] == "new" and "block_pairs" in r:
            lines.append(f"- N = {r['n']}: {r['all_pairs']:,} pairs in all, "
                         f"{r['block_pairs']:,} share one of the 17 hash blocks "
                         f"({r['block_pairs'] / r['all_pairs']:.2%}); "
                         f"{r.get('groups', '-')} duplicate groups found")
    h = doc.get("hash_realism", {})
    for name, st in ((k, v) for k, v in h.items() if isinstance(v, dict)):
        lines.append(f"- hashes of {st['images']} {name.replace('_', ' ')}: mean pair distance "
                     f"{st['mean_pair_bits']} bits, nearest neighbour median "
                     f"{st['nearest_median_bits']}, min {st['nearest_min_bits']}; mean bit "
                     f"bias {st['bit_bias']}; {st['block_pair_share']:.2%} of pairs share a "
                     "hash block")
    return ["## Near-duplicate search", ""] + lines + [""] if lines else []


def _loader_notes(doc: dict) -> list[str]:
    """What the loader's RSS is made of at the end of its epoch: anonymous memory, and pages
    of the memory-mapped shards (DALI's reader maps the tars; reclaimable page cache)."""
    lines = []
    for set_name in SETS:
        for code in doc["environment"]["git_commit"]:
            pts = sorted((r["n"], r) for r in doc["rows"] if "rss_anon_end_mb" in r and
                         (r["set"], r["step"], r["code"]) == (set_name, "loader", code))
            if len(pts) < 2:
                continue
            (n0, a), (n1, b) = pts[0], pts[-1]
            lines.append(f"- {set_name}, {code} (shuffle buffer {b['shuffle_buffer']} of "
                         f"{b['split']}): at N = {n1} RssAnon {b['rss_anon_end_mb']:.0f} MiB, "
                         f"RssFile {b['rss_file_end_mb']:.0f} MiB; from N = {n0}: "
                         f"{b['rss_anon_end_mb'] - a['rss_anon_end_mb']:+.0f} anon, "
                         f"{b['rss_file_end_mb'] - a['rss_file_end_mb']:+.0f} file")
    return ["## What the loader's memory is made of (end of the epoch)", ""] + lines + [""] \
        if lines else []


def markdown(doc: dict) -> str:
    codes = list(doc["environment"]["git_commit"])
    lines = _header(doc)
    for set_name in SETS:
        if any(r["set"] == set_name for r in doc["rows"]):
            lines += [f"## {SET_TITLES[set_name]}", ""]
            lines += _set_table(doc["rows"], set_name, codes) + [""]
    lines += _loader_notes(doc) + _dup_notes(doc)
    lines += ["## Growth exponents (slope of log y on log N)", ""] + _exponent_table(doc)
    return "\n".join(lines) + "\n"


# ---- the chart -------------------------------------------------------------------------------
def _panel(ax, doc: dict, set_name: str, key: str) -> None:
    """Log-log lines of `key` against N per step: new solid, old dashed."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    exps = {(e["set"], e["step"], e["code"]): e for e in doc["exponents"]}
    what = "time" if key == "seconds" else "work_peak"
    for step, colour in STEP_COLOURS.items():
        for code, style in (("old", "--"), ("new", "-")):
            pts = sorted((r["n"], r[key]) for r in doc["rows"] if "error" not in r and
                         (r["set"], r["step"], r["code"]) == (set_name, step, code) and
                         (key == "seconds" or r[key] >= MIN_FIT_MB))
            if not pts:
                continue
            e = exps.get((set_name, step, code), {}).get(f"{what}_exp")
            label = f"{step} {code}" + (f" (N^{e:.2f})" if e is not None else "")
            ax.plot(*zip(*pts), style, color=colour, marker="o" if code == "new" else "s",
                    mfc=colour if code == "new" else "white", ms=5, lw=1.6, label=label)
    ns = sorted({r["n"] for r in doc["rows"] if r["set"] == set_name})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ns, [f"{n:,}" for n in ns], fontsize=7, rotation=30)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("N images" + (" (dup: N hashes)" if set_name == "tiny" else ""))
    ax.set_ylabel("seconds" if key == "seconds" else "peak RSS above the imports, MiB")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))


def chart(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [s for s in SETS if any(r["set"] == s for r in doc["rows"])]
    fig, axes = plt.subplots(2, len(sets), figsize=(6.5 * len(sets), 11), squeeze=False)
    for col, set_name in enumerate(sets):
        _panel(axes[0, col], doc, set_name, "seconds")
        axes[0, col].set_title(f"time, {SET_TITLES[set_name]}", fontsize=9)
        _panel(axes[1, col], doc, set_name, "work_peak_mb")
        axes[1, col].set_title(f"memory the work adds, {set_name} set: VmHWM minus VmHWM after "
                               f"the imports\n(under {MIN_FIT_MB:g} MiB not drawn; the loader's "
                               "is mostly mapped shard pages, see the .md)", fontsize=9)
    env = doc["environment"]
    fig.suptitle(f"{env['cpu']}, {env['cores']} shared cores; old dashed, new solid; "
                 "(N^k): least-squares growth exponent", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- the files -------------------------------------------------------------------------------
def write_json(doc: dict, path: Path) -> None:
    """The document with its exponents fitted afresh (they follow every new row)."""
    doc["exponents"] = exponents(doc["rows"])
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_figures(doc: dict, stem: Path) -> None:
    """stem.md and stem.png from a document whose exponents are fitted."""
    stem.with_suffix(".md").write_text(markdown(doc))
    chart(doc, stem.with_suffix(".png"))


def replot(path: Path) -> None:
    """Rewrite a results file's exponents, table and chart from its measurements."""
    doc = json.loads(path.read_text())
    write_json(doc, path)
    write_figures(doc, path)
    print(f"rewrote {path.with_suffix('.md')} and .png")
