"""Run outputs after a test: results.json, results.md, predictions.csv and pictures.

Inputs are plain tensors and dicts from `KvasirClassifier.results`, so anyone can recompute
every metric from predictions.csv. results.json holds, beside the point estimates, `ci95`: 95%
percentile-bootstrap intervals (2000 resamples of the test samples, seed 0; `evidence.py`) for
accuracy, top3, top5, f1_macro, mcc and per-class F1 (`f1_per_class`, in class order), with
`num_samples`; `ece` (15 equal-width bins of top-1 confidence) and `calibration` (the fitted
temperature and the ECE before and after, when `--model.calibrate true`); and what identifies
the run for `kvasir-report`: seed, fold, image size, pretrained, params and
`test_samples_sha256` (the exact test sample list).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from shard_tools.manifest import samples, split_digest  # noqa: E402

from .evidence import bootstrap_ci, expected_calibration_error, reliability_png  # noqa: E402


@dataclass(frozen=True)
class RunInfo:
    """What identifies and describes a run, beside its metrics."""

    model: str
    split: str = "test"
    images_per_second: float | None = None  # training, all ranks
    data_wait: float | None = None  # share of training wall time waiting for data
    seed: int | None = None
    fold: int | None = None
    image_size: int | None = None
    pretrained: str = "off"
    params: int | None = None


def _evidence(labels: np.ndarray, probs: np.ndarray, results: dict, classes: list[str]) -> dict:
    """ci95, ece and calibration entries of results.json."""
    ci = bootstrap_ci(labels, probs)
    meta = ci.pop("_meta")
    ci["f1_per_class"] = dict(zip(classes, ci["f1_per_class"]))
    out = {"ci95": ci, "bootstrap": meta, "ece": expected_calibration_error(labels, probs)}
    cal = results.get("calibration")
    if cal:
        before = expected_calibration_error(labels, results["uncalibrated"].numpy())
        out["calibration"] = {**cal, "calibrated_probabilities": True,
                              "test_ece_before": before, "test_ece_after": out["ece"]}
    else:
        out["calibration"] = {"calibrated_probabilities": False}
    return out


def write_results(run_dir: Path, results: dict, classes: list[str], info: RunInfo,
                  shard_set=None) -> dict:
    """Write every file of the run's report; return results.json's content."""
    run_dir.mkdir(parents=True, exist_ok=True)
    s = {k.split("/", 1)[1]: v for k, v in results["scalars"].items()}
    pc = results["per_class"]
    keys, labels, probs = results["predictions"]
    per_class = {c: {"precision": float(pc["precision"][i]), "recall": float(pc["recall"][i]),
                     "f1": float(pc["f1"][i]), "support": int((labels == i).sum())}
                 for i, c in enumerate(classes)}
    out = {"model": info.model, "split": info.split, "num_samples": len(labels),
           "accuracy": s["accuracy"], "loss": s["loss"], "f1_macro": s["f1_macro"],
           "top3": s["top3"], "top5": s["top5"], "mcc": s["mcc"], "per_class": per_class,
           **_evidence(labels.numpy(), probs.numpy(), results, classes),
           "train_images_per_second": info.images_per_second,
           **{k: v for k, v in asdict(info).items() if k not in ("model", "split",
                                                                   "images_per_second")}}
    if shard_set is not None:
        test_splits = shard_set.manifest.roles(info.fold)["test"]
        out["test_samples_sha256"] = split_digest(samples(shard_set.root), test_splits)
    (run_dir / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    _predictions_csv(run_dir / "predictions.csv", classes, keys, labels, probs)
    (run_dir / "results.md").write_text(results_markdown(out))
    title = (f"{info.model}, {info.split} split ({len(labels)} images): accuracy "
             f"{100 * out['accuracy']:.2f}%, macro F1 {out['f1_macro']:.4f}, MCC {out['mcc']:.4f}")
    confusion_png(run_dir / "confusion_matrix.png", pc["confusion"].numpy(), classes,
                  per_class, title)
    reliability_png(run_dir / "reliability.png", labels.numpy(), probs.numpy(),
                    f"{info.model}, {info.split} split: reliability"
                    + (" (temperature-scaled)" if out["calibration"]["calibrated_probabilities"]
                       else ""))
    if (run_dir / "metrics.csv").exists():
        curves_png(run_dir / "curves.png", run_dir)
    return out


def _predictions_csv(path: Path, classes, keys, labels, probs) -> None:
    order = keys.argsort()
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["key", "label", "pred", *[f"p_{c}" for c in classes]])
        for i in order.tolist():
            w.writerow([f"{int(keys[i]):06d}", int(labels[i]), int(probs[i].argmax()),
                        *[f"{p:.6f}" for p in probs[i].tolist()]])


def results_markdown(r: dict) -> str:
    """The reference table (Model | Accuracy | loss | F1-Score | Top-3 | Top-5) and more."""
    ips, ci, cal = r.get("train_images_per_second"), r["ci95"], r["calibration"]

    def iv(k: str, scale: float = 1, fmt: str = ".4f") -> str:
        return f"{scale * ci[k][0]:{fmt}}-{scale * ci[k][1]:{fmt}}"

    lines = [
        f"# {r['model']} on the {r['split']} split ({r['num_samples']} images)", "",
        "| Model | Accuracy | loss | F1-Score | Top-3 | Top-5 | MCC |",
        "|---|---|---|---|---|---|---|",
        f"| {r['model']} | {100 * r['accuracy']:.2f} | {r['loss']:.3f} | {r['f1_macro']:.4f} "
        f"| {r['top3']:.5f} | {r['top5']:.5f} | {r['mcc']:.4f} |",
        f"| 95% CI | {iv('accuracy', 100, '.2f')} | | {iv('f1_macro')} | {iv('top3', 1, '.5f')} "
        f"| {iv('top5', 1, '.5f')} | {iv('mcc')} |", "",
        f"Accuracy is plain top-1 over samples; F1 is macro-averaged over classes. Intervals: "
        f"percentile bootstrap, {r['bootstrap']['resamples']} resamples of the "
        f"{r['num_samples']} test samples. Expected calibration error (15 bins): "
        f"{r['ece']:.4f}" + (f", temperature {cal['temperature']:.3f} fitted on validation "
                             f"(test ECE {cal['test_ece_before']:.4f} before scaling)"
                             if cal["calibrated_probabilities"] else "") + ".", "",
        "| Class | Precision | Recall | F1 (95% CI) | Support |", "|---|---|---|---|---|",
    ]
    for c, m in r["per_class"].items():
        lo, hi = ci["f1_per_class"][c]
        lines.append(f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} "
                     f"({lo:.3f}-{hi:.3f}) | {m['support']} |")
    if ips:
        lines += ["", f"Training throughput: {ips:.1f} images/s."]
    return "\n".join(lines) + "\n"


def confusion_png(path: Path, cm: np.ndarray, classes: list[str], per_class: dict,
                  title: str) -> None:
    """Counts and row-normalized confusion matrices side by side, plus per-class F1."""
    n = len(classes)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = 0.5 * n + 0.6  # inches per matrix panel
    fig, axes = plt.subplots(1, 3, figsize=(2 * side + 4.2, side + 2.4), layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1, 0.45]})
    panels = ((axes[0], cm, "counts", "d"), (axes[1], norm, "recall (row-normalized)", ".2f"))
    for ax, data, name, fmt in panels:
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(n):
            for j in range(n):
                v = data[i, j]
                if v:
                    ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.6 else "black")
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes if ax is axes[0] else [""] * n, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_title(name, fontsize=10)
    axes[0].set_ylabel("true")
    f1 = [per_class[c]["f1"] for c in classes]
    axes[2].barh(range(n), f1, height=0.8, color="tab:blue")
    axes[2].set_yticks(range(n), [""] * n)
    axes[2].set_xlim(0, 1)
    axes[2].set_ylim(n - 0.5, -0.5)  # rows line up with the matrices' rows
    axes[2].set_box_aspect(1 / 0.45)
    for i, v in enumerate(f1):
        axes[2].text(min(v, 0.98), i, f"{v:.2f}", va="center", ha="right", fontsize=8,
                     color="white")
    axes[2].set_title("F1 per class", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of metrics.csv, preceded by those of earlier sessions of a resumed run."""
    files = sorted(run_dir.glob("metrics.part*.csv")) + [run_dir / "metrics.csv"]
    return [r for f in files if f.exists() for r in csv.DictReader(open(f))]


def curves_png(path: Path, run_dir: Path) -> None:
    """Loss and accuracy per epoch, training and validation."""
    rows = read_metrics(run_dir)

    def series(col: str) -> tuple[list[float], list[float]]:
        pts = [(float(r["epoch"]), float(r[col])) for r in rows if r.get(col) not in (None, "")]
        return [p[0] + 1 for p in pts], [p[1] for p in pts]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for col, label in (("train/loss_epoch", "train (smoothed CE)"), ("val/loss", "validation")):
        x, y = series(col)
        if x:
            a.plot(x, y, marker="o", ms=3, label=label)
    a.set_title("loss")
    for col, label in (("val/accuracy", "val accuracy"), ("val/f1_macro", "val macro F1")):
        x, y = series(col)
        if x:
            b.plot(x, y, marker="o", ms=3, label=label)
    b.set_title("validation metrics")
    b.set_ylim(0, 1)
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
