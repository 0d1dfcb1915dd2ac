"""Statistical evidence for test results, in numpy alone: metrics, bootstrap intervals,
calibration, temperature scaling and paired comparisons of two models.

Conventions (every function): `labels` int array (n,) of class indices, `probs` float array
(n, C) whose rows sum to 1, `logits` float array (n, C). Predictions are `probs.argmax(1)`;
ties go to the lower class index, as torch's argmax does (and top-k ranks tied probabilities
by class index, where torch.topk's order among exact ties is unspecified; exact ties do not
happen with real softmax outputs).

The metrics match what the trainer reports through torchmetrics (`module.eval_metrics`):

- accuracy, top3, top5: micro top-k accuracy over samples, k = min(k, C).
- f1_macro: torchmetrics' `MulticlassF1Score(average="macro")`: the mean of per-class F1 over
  the classes that occur (in the labels or in the predictions); a class with neither support
  nor predictions is left out of the mean rather than counted as 0 (torchmetrics 1.x,
  `_adjust_weights_safe_divide`). With every class present in the labels, as on Kvasir's
  test split, this is the plain mean over all C classes.
- mcc: multiclass Matthews correlation (Gorodkin's R_K), 0 when undefined.

Bootstrap: percentile intervals over test samples. The index matrix is
`np.random.default_rng(seed).integers(0, n, size=(resamples, n))` (`bootstrap_indices`), one row
per resample, so anyone can redraw the same resamples. Interval dicts carry the method facts
under the key "_meta": {"resamples", "seed", "level", "method": "percentile"}.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

METRICS = ("accuracy", "top3", "top5", "f1_macro", "mcc")


# -- point metrics ---------------------------------------------------------------------------
def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows true class, columns predicted class."""
    flat = np.asarray(labels) * num_classes + np.asarray(preds)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def topk_correct(labels: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """(n,) bool: the label is among the k highest probabilities (k = min(k, C))."""
    k = min(k, probs.shape[1])
    # Stable sort of -p: among equal probabilities the lower class index ranks first.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return (order == np.asarray(labels)[:, None]).any(1)


def _from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, f1 (per class), f1_macro and mcc of confusion matrices cm (..., C, C)."""
    cm = cm.astype(np.float64)
    total = cm.sum((-2, -1))
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)  # per class: true count, predicted count
    denom = support + predicted  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0  # torchmetrics leaves classes with no tp, fp or fn out of the mean
    f1_macro = (f1 * present).sum(-1) / np.maximum(present.sum(-1), 1)
    correct = tp.sum(-1)
    cov_tp = correct * total - (support * predicted).sum(-1)
    cov = np.sqrt((total**2 - (predicted**2).sum(-1)) * (total**2 - (support**2).sum(-1)))
    mcc = np.divide(cov_tp, cov, out=np.zeros_like(cov), where=cov > 0)
    accuracy = np.divide(correct, total, out=np.zeros_like(correct), where=total > 0)
    return {"accuracy": accuracy, "f1": f1, "f1_macro": f1_macro, "mcc": mcc}


def point_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """accuracy, top3, top5, f1_macro, mcc (floats) and f1_per_class (list of C floats)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    m = _from_confusion(confusion(labels, probs.argmax(1), probs.shape[1]))
    return {"accuracy": float(m["accuracy"]),
            "top3": float(topk_correct(labels, probs, 3).mean()),
            "top5": float(topk_correct(labels, probs, 5).mean()),
            "f1_macro": float(m["f1_macro"]), "mcc": float(m["mcc"]),
            "f1_per_class": [float(v) for v in m["f1"]]}


# -- bootstrap -------------------------------------------------------------------------------
def bootstrap_indices(n: int, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """(resamples, n) sample indices drawn with replacement: row r is resample r."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values: np.ndarray, level: float) -> np.ndarray:
    """Percentile interval of values (R, ...) along axis 0 -> (2, ...)."""
    tail = 100 * (1 - level) / 2
    return np.percentile(values, [tail, 100 - tail], axis=0)


def _meta(resamples: int, seed: int, level: float) -> dict:
    return {"resamples": resamples, "seed": seed, "level": level, "method": "percentile"}


def _resampled_confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int,
                         idx: np.ndarray) -> np.ndarray:
    """(R, C, C) confusion matrices of the resamples idx (R, n), one bincount for all."""
    c2 = num_classes**2
    cell = (labels * num_classes + preds)[idx]  # (R, n) confusion cell of each drawn sample
    offset = np.arange(len(idx))[:, None] * c2  # resample r counts into cells [r*C², (r+1)*C²)
    counts = np.bincount((cell + offset).ravel(), minlength=len(idx) * c2)
    return counts.reshape(len(idx), num_classes, num_classes)


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of `point_metrics` over the test samples.

    Returns {"accuracy": [lo, hi], "top3", "top5", "f1_macro", "mcc": [lo, hi] each,
    "f1_per_class": [[lo, hi]] * C, "_meta": {"resamples", "seed", "level", "method"}}.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    idx = bootstrap_indices(len(labels), resamples, seed)
    m = _from_confusion(_resampled_confusion(labels, probs.argmax(1), probs.shape[1], idx))
    out = {k: _interval(m[k], level).tolist() for k in ("accuracy", "f1_macro", "mcc")}
    for k in (3, 5):
        out[f"top{k}"] = _interval(topk_correct(labels, probs, k)[idx].mean(1), level).tolist()
    out["f1_per_class"] = _interval(m["f1"], level).T.tolist()  # (C, 2)
    out["_meta"] = _meta(resamples, seed, level)
    return {k: out[k] for k in (*METRICS, "f1_per_class", "_meta")}


def resampled_runs_mean(labels: np.ndarray, probs_list: list[np.ndarray],
                        idx: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro F1 of each resample idx (R, n), averaged over the runs: (R,) each.

    Every run is resampled with the same rows of idx (the runs share the n test samples)."""
    labels = np.asarray(labels)
    acc, f1 = np.zeros(len(idx)), np.zeros(len(idx))
    for probs in probs_list:
        probs = np.asarray(probs)
        m = _from_confusion(_resampled_confusion(labels, probs.argmax(1), probs.shape[1], idx))
        acc += m["accuracy"]
        f1 += m["f1_macro"]
    return {"accuracy": acc / len(probs_list), "f1_macro": f1 / len(probs_list)}


def runs_mean_ci(labels: np.ndarray, probs_list: list[np.ndarray], resamples: int = 2000,
                 seed: int = 0, level: float = 0.95) -> dict:
    """Interval of one configuration's mean-over-runs accuracy and macro F1 from resampling
    the test samples (the same indices for every run): {"accuracy": {"mean", "ci"},
    "f1_macro": {...}, "_meta"}. Seed-to-seed spread is not in it: that is the runs' std."""
    idx = bootstrap_indices(len(labels), resamples, seed)
    point = resampled_runs_mean(labels, probs_list, np.arange(len(labels))[None])
    res = resampled_runs_mean(labels, probs_list, idx)
    out = {k: {"mean": float(point[k][0]), "ci": _interval(res[k], level).tolist()}
           for k in ("accuracy", "f1_macro")}
    out["_meta"] = _meta(resamples, seed, level)
    return out


def paired_bootstrap_diff(labels: np.ndarray, probs_a: list[np.ndarray],
                          probs_b: list[np.ndarray], resamples: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict:
    """Configuration A minus configuration B in accuracy and macro F1, paired over samples.

    Each configuration's value is the mean over its runs (all on the same n test samples in
    the same order); the interval resamples the test samples with the same indices for A, B
    and every run. Returns {"accuracy": {"diff": float, "ci": [lo, hi]}, "f1_macro": {...},
    "_meta": {"resamples", "seed", "level", "method"}}.
    """
    n = len(labels)
    if any(len(p) != n for p in [*probs_a, *probs_b]):
        raise ValueError("every run must hold predictions for the same n test samples")
    whole = np.arange(n)[None]  # the original sample: the point difference
    pa, pb = resampled_runs_mean(labels, probs_a, whole), resampled_runs_mean(labels, probs_b,
                                                                               whole)
    idx = bootstrap_indices(n, resamples, seed)
    ra, rb = resampled_runs_mean(labels, probs_a, idx), resampled_runs_mean(labels, probs_b, idx)
    out = {k: {"diff": float(pa[k][0] - pb[k][0]), "ci": _interval(ra[k] - rb[k], level).tolist()}
           for k in ("accuracy", "f1_macro")}
    out["_meta"] = _meta(resamples, seed, level)
    return out


# -- calibration -----------------------------------------------------------------------------
def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = 15
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin over [0, 1]: (counts, accuracy, mean confidence), (bins,)
    each; empty bins hold accuracy and confidence 0. Bin b is (b/bins, (b+1)/bins]; confidence
    0 falls into the first bin."""
    probs = np.asarray(probs)
    conf, correct = probs.max(1), probs.argmax(1) == np.asarray(labels)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    safe = np.maximum(counts, 1)
    acc = np.bincount(which, weights=correct, minlength=bins) / safe
    mean_conf = np.bincount(which, weights=conf, minlength=bins) / safe
    return counts, acc, mean_conf


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over bins of |accuracy - confidence| weighted by the bin's
    share of the samples, top-1 confidence, `bins` equal-width bins over [0, 1]."""
    counts, acc, conf = reliability_bins(labels, probs, bins)
    return float((counts / counts.sum() * np.abs(acc - conf)).sum())


def reliability_png(path: str | Path, labels: np.ndarray, probs: np.ndarray, title: str,
                    bins: int = 15) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, the gap shaded,
    the bin counts below; ECE in the title. A small PNG (about 40 KB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts, acc, conf = reliability_bins(labels, probs, bins)
    ece = expected_calibration_error(labels, probs, bins)
    edges = np.linspace(0, 1, bins + 1)
    centre, width = (edges[:-1] + edges[1:]) / 2, 1 / bins
    used = counts > 0
    fig, (top, low) = plt.subplots(2, 1, figsize=(4.6, 5.2), sharex=True, layout="constrained",
                                   gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centre[used], acc[used], width=width * 0.95, color="tab:blue", label="accuracy")
    gap_lo, gap_hi = np.minimum(acc, conf), np.maximum(acc, conf)
    top.bar(centre[used], (gap_hi - gap_lo)[used], bottom=gap_lo[used], width=width * 0.95,
            facecolor="none", hatch="///", edgecolor="tab:red", linewidth=0.8,
            label="gap to mean confidence")
    top.plot(centre[used], conf[used], "_", ms=9, mew=1.5, color="tab:red",
             label="mean confidence in bin")
    top.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy in bin")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    top.set_title(f"{title}\nECE {ece:.4f} ({bins} bins, n = {counts.sum()})", fontsize=9)
    low.bar(centre, counts, width=width * 0.95, color="gray")
    for x, c in zip(centre[used], counts[used]):
        low.text(x, c, str(c), ha="center", va="bottom", fontsize=6)
    low.set_ylim(0, counts.max() * 1.25)
    low.set_xlim(0, 1)
    low.set_xlabel("top-1 confidence")
    low.set_ylabel("samples")
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- temperature scaling ---------------------------------------------------------------------
def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(n, C) log softmax(logits / T), stable for huge logits (the row maximum is removed)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(n, C) softmax(logits / T)."""
    return np.exp(log_softmax(logits, temperature))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats per sample) of softmax(logits / T)."""
    lp = log_softmax(logits, temperature)
    return float(-lp[np.arange(len(lp)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, t_min: float = 0.05,
                    t_max: float = 20.0) -> float:
    """Temperature scaling (Guo et al. 2017): the T in [t_min, t_max] minimising `nll`.

    The NLL is convex in beta = 1/T, its derivative mean(E_softmax[z] - z_label) increases
    with beta, so bisection of log(beta) on the derivative's sign finds the minimum; at a
    bound when the minimum lies beyond it (e.g. T -> 0 when every prediction is right).
    Fit T on validation logits, not on the test samples it is then judged on.
    """
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    z_label = z[np.arange(len(z)), y]

    def slope(beta: float) -> float:  # d NLL / d beta
        return float((softmax(z * beta) * z).sum(1).mean() - z_label.mean())

    lo, hi = math.log(1 / t_max), math.log(1 / t_min)  # log beta
    if slope(math.exp(lo)) >= 0:
        return t_max
    if slope(math.exp(hi)) <= 0:
        return t_min
    for _ in range(60):  # the bracket shrinks to ~6/2^60 in log beta
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(math.exp(mid)) < 0 else (lo, mid)
    return float(1 / math.exp((lo + hi) / 2))


# -- paired tests ----------------------------------------------------------------------------
def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> dict:
    """Exact two-sided McNemar test on paired correctness (n,) bool arrays.

    b: A right and B wrong, c: A wrong and B right. p = min(1, 2 P[X <= min(b, c)]) with
    X ~ Bin(b + c, 1/2), in exact integer arithmetic (one rounding at the end, correct for
    any b + c); p = 1 when b + c == 0. Returns {"b": int, "c": int, "p": float}.
    """
    a, b_ = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a.shape != b_.shape:
        raise ValueError("a_correct and b_correct must pair the same samples")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "p": 1.0}
    term = tail = 1  # comb(n, 0); comb(n, i + 1) = comb(n, i) * (n - i) // (i + 1), exactly
    for i in range(min(b, c)):
        term = term * (n - i) // (i + 1)
        tail += term
    return {"b": b, "c": c, "p": min(1.0, 2 * tail / 2**n)}  # int / int: correctly rounded
