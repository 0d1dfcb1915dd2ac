"""`kvasir-report RUN_DIR... --out DIR`: a leaderboard of run folders with their evidence.

    kvasir-report runs/ --out report/
    kvasir-report runs/fastvit_t8/version_0 runs/fastvit_t8/version_1 runs/sa12/ --out report/

A RUN_DIR is a folder written by `kvasir-train` (config.yaml, results.json, predictions.csv) or
any folder above such folders (searched recursively for results.json). Writes into --out:

- leaderboard.md: starts with the table (one row per configuration, README-ready), then the
  test-sample intervals, the paired comparisons and the list of runs.
- leaderboard.csv (one row per configuration, full precision) and comparisons.csv.
- leaderboard.png: accuracy and macro F1 per configuration (mean, std error bar, each run as a
  point) and training images/s on a second axis.

Configurations. Runs are grouped by (model, image size, pretrained, recipe, test split). The
recipe is the first 8 hex digits of the SHA-256 of the resolved config.yaml (canonical JSON)
without the keys in `VARYING_KEYS`, which differ between repeats of one experiment (seeds,
folds, where the data and logs live, threads); it is shown with the CSV logger's `name`. Each
metric is the mean and the sample standard deviation (ddof=1) over the configuration's runs;
with one run the std is "—" in leaderboard.md and empty in the CSV. Metrics are results.json's
(torchmetrics, as the trainer reported them); ECE is results.json's `ece` when present, else
computed from predictions.csv (15 bins, `evidence.expected_calibration_error`).

Test splits. Folds (`--data.fold`) choose the validation part; the test split stays the
published one, so the runs of a configuration over seeds and folds share their test samples.
A run's split is its results.json `test_samples_sha256` when every given run has
one, else (for all runs alike, so that old and new runs are not told apart by the kind of
hash) the SHA-256 of predictions.csv's (key, label) list. Runs tested on different splits are
refused (exit 2, naming the folders of each split) unless `--allow-different-tests`: then
every configuration is kept per split and only configurations of one split are compared.
The runs of one split must list the same (key, label) samples, or the report is refused.

Comparisons, for every two configurations of one split (A ranked above B):
- paired bootstrap (`evidence.paired_bootstrap_diff`): A minus B in accuracy and macro F1,
  each configuration's value the mean over its runs, 95% percentile interval from resampling
  the test samples with the same indices for every run of A and B;
- exact McNemar (`evidence.mcnemar_exact`) on pooled pairs: each configuration's runs sorted
  by (seed, fold, folder), run i of A paired with run i of B for i < min(#runs A, #runs B), the
  per-sample correctness of those pairs concatenated. With several pairs the same test image
  counts several times, which the test treats as independent: the p-value is then optimistic,
  and the bootstrap interval is the better guide.

User errors (nothing found, a run folder missing a file, unreadable or inconsistent files,
different test splits) print one line `kvasir-report: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from shard_tools.errors import run_command

from . import evidence
from .runs import (
    METRICS,
    PROG,
    Config,
    ReportError,
    Run,
    assign_test_ids,
    check_test_splits,
    compare,
    find_run_dirs,
    group,
    load_run,
    short,
)


# -- writing ---------------------------------------------------------------------------------
def _pm(mean: float, std: float | None, scale: float, digits: int) -> str:
    sd = "—" if std is None else f"{scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {sd}"


def _params(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f} M"


def _pretrained(p: str) -> str:
    return Path(p).name if "/" in p or "\\" in p else p


def _ids(runs: list[Run], attr: str) -> str:
    v = [getattr(r, attr) for r in runs]
    return ",".join("" if x is None else str(x) for x in v)


def _row(cells: list) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def main_table(configs: list[Config]) -> list[str]:
    """The README table: one row per configuration, mean ± std over its runs."""
    split_col = len({c.test_id for c in configs}) > 1
    head = ["Configuration", "Model", "Size", "Pretrained", "Runs", "Accuracy (%)",
            "Macro F1", "Top-3 (%)", "Top-5 (%)", "MCC", "ECE", "Train img/s", "Params"]
    head += ["Test split"] if split_col else []
    lines = [_row(head), "|" + "---|" * len(head)]
    for c in configs:
        ips = c.images_per_second
        cells = [c.label, c.model, c.image_size, _pretrained(c.pretrained), len(c.runs),
                 _pm(*c.stat("accuracy"), 100, 2), _pm(*c.stat("f1_macro"), 1, 4),
                 _pm(*c.stat("top3"), 100, 2), _pm(*c.stat("top5"), 100, 2),
                 _pm(*c.stat("mcc"), 1, 4), _pm(*c.stat("ece"), 1, 4),
                 "—" if ips is None else f"{ips:.1f}", _params(c.params)]
        lines.append(_row(cells + ([c.test_id[:8]] if split_col else [])))
    return lines


def interval_table(configs: list[Config]) -> list[str]:
    """Each configuration's mean over runs with its test-sample bootstrap interval."""
    lines = [_row(["Configuration", "Runs", "Accuracy (%)", "95% CI", "Macro F1", "95% CI"]),
             "|---|---|---|---|---|---|"]
    for c in configs:
        a, f = c.ci["accuracy"], c.ci["f1_macro"]
        lines.append(_row([c.label, len(c.runs), f"{100 * a['mean']:.2f}",
                           f"{100 * a['ci'][0]:.2f} – {100 * a['ci'][1]:.2f}",
                           f"{f['mean']:.4f}", f"{f['ci'][0]:.4f} – {f['ci'][1]:.4f}"]))
    return lines


def comparison_table(comparisons: list[dict]) -> list[str]:
    """A minus B per pair of configurations: bootstrap differences and McNemar."""
    lines = [_row(["A", "B", "Pairs", "Δ accuracy (pp)", "95% CI", "Δ macro F1", "95% CI",
                   "b / c", "McNemar p"]), "|---|---|---|---|---|---|---|---|---|"]
    for cmp in comparisons:
        acc, f1 = cmp["bootstrap"]["accuracy"], cmp["bootstrap"]["f1_macro"]
        mc = cmp["mcnemar"]
        lines.append(_row([cmp["a"].label, cmp["b"].label, cmp["pairs"],
                           f"{100 * acc['diff']:+.2f}",
                           f"{100 * acc['ci'][0]:+.2f} – {100 * acc['ci'][1]:+.2f}",
                           f"{f1['diff']:+.4f}", f"{f1['ci'][0]:+.4f} – {f1['ci'][1]:+.4f}",
                           f"{mc['b']} / {mc['c']}", _p(mc["p"])]))
    return lines


def runs_table(configs: list[Config]) -> list[str]:
    """Every run with its seed, fold and main metrics."""
    lines = [_row(["Configuration", "Run folder", "Seed", "Fold", "Accuracy (%)", "Macro F1",
                   "ECE"]), "|---|---|---|---|---|---|---|"]
    for c in configs:
        for r in c.runs:
            m = r.metrics
            lines.append(_row([c.label, r.dir, "—" if r.seed is None else r.seed,
                               "—" if r.fold is None else r.fold, f"{100 * m['accuracy']:.2f}",
                               f"{m['f1_macro']:.4f}", f"{m['ece']:.4f}"]))
    return lines


def markdown(configs: list[Config], comparisons: list[dict], id_source: str, resamples: int,
             seed: int) -> str:
    """leaderboard.md: the README table first, then intervals, comparisons and runs."""
    splits = sorted({(c.test_id, len(c.runs[0].labels)) for c in configs})
    split_text = "; ".join(f"{sid[:8]} ({n} samples)" for sid, n in splits)
    boot = f"{resamples} resamples, seed {seed}"
    lines = main_table(configs) + [
        "",
        "Mean ± sample standard deviation (ddof=1) over each configuration's runs (seeds or "
        "folds); \"± —\" where a configuration has one run. Accuracy and top-k: micro, over "
        "test samples; F1: macro over classes; ECE: 15 equal-width bins of top-1 confidence. "
        "Configuration: the logger's name and the recipe hash. "
        f"Test split{'s' if len(splits) > 1 else ''}: {split_text}, identified by the "
        f"{id_source}.",
        "", "## Test-sample uncertainty", "",
        "95% percentile bootstrap intervals of each configuration's mean over its runs, "
        f"resampling the test images ({boot}; the same images for every run). The std above "
        "is the run-to-run spread; these intervals are the uncertainty from the finite test "
        "set.", "",
        *interval_table(configs),
        "", "## Paired comparisons", ""]
    if comparisons:
        lines += [
            "A minus B, A ranked above B. Δ: difference of the configurations' means over "
            f"runs, 95% paired bootstrap interval over the test images ({boot}). McNemar: "
            "exact two-sided test on the pooled pairs (each configuration's runs sorted by "
            "(seed, fold), run i of A with run i of B, min(runs) pairs); b: A right and B "
            "wrong, c: the reverse. With more than one pair an image counts more than once, "
            "so p is optimistic there.", "", *comparison_table(comparisons)]
    else:
        lines.append("Fewer than two configurations share a test split: nothing to compare.")
    return "\n".join(lines + ["", "## Runs", "", *runs_table(configs)]) + "\n"


def _p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def write_csvs(out: Path, configs: list[Config], comparisons: list[dict]) -> None:
    """leaderboard.csv (a row per configuration) and comparisons.csv, full precision."""
    cols = ["rank", "configuration", "name", "recipe", "model", "image_size", "pretrained",
            "runs", "seeds", "folds", "test_split"]
    for m in METRICS:
        cols += [f"{m}_mean", f"{m}_std"]
    cols += ["accuracy_ci95_lo", "accuracy_ci95_hi", "f1_macro_ci95_lo", "f1_macro_ci95_hi",
             "train_images_per_second", "params", "run_dirs"]
    with open(out / "leaderboard.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(cols)
        for i, c in enumerate(configs, 1):
            row = [i, c.label, c.name, c.recipe, c.model, c.image_size, c.pretrained,
                   len(c.runs), _ids(c.runs, "seed"), _ids(c.runs, "fold"), c.test_id]
            for m in METRICS:
                mean, std = c.stat(m)
                row += [repr(mean), "" if std is None else repr(std)]
            row += [*c.ci["accuracy"]["ci"], *c.ci["f1_macro"]["ci"],
                    "" if c.images_per_second is None else c.images_per_second,
                    "" if c.params is None else c.params, ";".join(str(r.dir) for r in c.runs)]
            w.writerow(row)
    with open(out / "comparisons.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["a", "b", "test_split", "runs_a", "runs_b", "pairs", "accuracy_diff",
                    "accuracy_diff_ci95_lo", "accuracy_diff_ci95_hi", "f1_macro_diff",
                    "f1_macro_diff_ci95_lo", "f1_macro_diff_ci95_hi", "mcnemar_b", "mcnemar_c",
                    "mcnemar_p"])
        for cmp in comparisons:
            acc, f1, mc = cmp["bootstrap"]["accuracy"], cmp["bootstrap"]["f1_macro"], \
                cmp["mcnemar"]
            w.writerow([cmp["a"].label, cmp["b"].label, cmp["a"].test_id, len(cmp["a"].runs),
                        len(cmp["b"].runs), cmp["pairs"], acc["diff"], *acc["ci"], f1["diff"],
                        *f1["ci"], mc["b"], mc["c"], mc["p"]])


def figure(path: Path, configs: list[Config]) -> None:
    """Accuracy and macro F1 per configuration (mean ± std, runs as points), images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(configs)
    x = np.arange(k)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.7 * k + 2.5), 4.6), layout="constrained")
    speed = ax.twinx()
    ips = [c.images_per_second for c in configs]
    for i, v in enumerate(ips):
        if v is not None:
            speed.bar(i, v, width=0.7, color="0.87",
                      label="training images/s (right axis)" if not speed.patches else None)
            speed.text(i, 0, f"{v:.1f} img/s", ha="center", va="bottom", fontsize=7,
                       color="0.4")
    speed.set_ylabel("training images/s")
    speed.set_ylim(0, max([v for v in ips if v is not None], default=1) * 1.35)
    ax.set_zorder(speed.get_zorder() + 1)  # the scores above the speed bars
    ax.patch.set_visible(False)
    values = []
    # Accuracy left of centre, F1 right; each run's points on the inner side of its mean,
    # the mean's value on the outer side, so that nothing overlaps.
    for side, metric, colour, name in ((-1, "accuracy", "tab:blue", "accuracy"),
                                       (1, "f1_macro", "tab:orange", "macro F1")):
        for i, c in enumerate(configs):
            runs = np.array([r.metrics[metric] for r in c.runs])
            values += runs.tolist()
            centre = i + 0.17 * side
            ax.scatter(np.full(len(runs), centre - 0.07 * side), runs, s=16, color=colour,
                       alpha=0.5, linewidths=0, label=f"{name}, each run" if i == 0 else None)
            mean, std = c.stat(metric)
            ax.errorbar(centre, mean, yerr=std or 0, fmt="D", ms=6, color=colour, capsize=5,
                        elinewidth=1.5, label=f"{name}, mean ± std" if i == 0 else None)
            ax.annotate(f"{mean:.4f}", (centre, mean), xytext=(8 * side, 0),
                        textcoords="offset points", fontsize=7, color=colour, va="center",
                        ha="left" if side > 0 else "right")
    lo, hi = min(values), max(values)
    pad = max(0.02, 0.15 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    ax.set_ylabel("test accuracy / macro F1")
    ax.set_xticks(x, [("" if c.name == c.model else f"{c.name}\n")
                      + f"{c.model}, {c.image_size} px\npretrained "
                      f"{_pretrained(c.pretrained)}\nrecipe {c.recipe}, {len(c.runs)} "
                      f"run{'s' if len(c.runs) > 1 else ''}" for c in configs], fontsize=8)
    ax.set_xlim(-0.6, k - 0.4)
    ax.grid(axis="y", alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = speed.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, fontsize=7, loc="outside lower center", ncol=3)
    n = len(configs[0].runs[0].labels)
    ax.set_title(f"Test accuracy and macro F1 per configuration ({n} test images)",
                 fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- command ---------------------------------------------------------------------------------
def report(paths: list[str], out: Path, allow_different_tests: bool = False,
           resamples: int = 2000, seed: int = 0) -> list[Config]:
    """Read the runs, write leaderboard.md/.csv/.png and comparisons.csv; the configurations."""
    runs = [load_run(d) for d in find_run_dirs(paths)]
    id_source = assign_test_ids(runs)
    check_test_splits(runs, allow_different_tests)
    configs = group(runs)
    for c in configs:
        c.ci = evidence.runs_mean_ci(c.runs[0].labels, [r.probs for r in c.runs], resamples,
                                     seed)
    comparisons = [compare(a, b, resamples, seed) for i, a in enumerate(configs)
                   for b in configs[i + 1:] if a.test_id == b.test_id]
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "leaderboard.md").write_text(markdown(configs, comparisons, id_source,
                                                     resamples, seed))
        write_csvs(out, configs, comparisons)
        figure(out / "leaderboard.png", configs)
    except OSError as e:
        raise ReportError(f"cannot write into {out} ({short(e)}); choose a writable --out "
                          "folder") from None
    return configs


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Leaderboard, intervals and paired "
                                 "comparisons of kvasir-train run folders.",
                                 epilog="--debug (or KVASIR_DEBUG=1) shows tracebacks of errors")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR",
                    help="run folders, or folders searched recursively for them")
    ap.add_argument("--out", required=True, type=Path, help="folder for the report files")
    ap.add_argument("--allow-different-tests", action="store_true",
                    help="accept runs of different test splits; compare only within a split")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return ap


def _run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.resamples < 1:
        raise ReportError("--resamples must be at least 1")
    configs = report(args.runs, args.out, args.allow_different_tests, args.resamples,
                     args.seed)
    table = (args.out / "leaderboard.md").read_text().split("\n\n", 1)[0]
    runs = sum(len(c.runs) for c in configs)
    print(table)
    print(f"{PROG}: {runs} runs in {len(configs)} configurations; wrote "
          f"{args.out / 'leaderboard.md'}, leaderboard.csv, comparisons.csv, leaderboard.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kvasir-report`; returns the exit status (2: a user error)."""
    return run_command(PROG, _run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
