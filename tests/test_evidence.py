"""kvasir_dali.evidence against independent straightforward computations on generated data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvasir_dali import evidence as ev


def sample(n: int, c: int, seed: int, skill: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """labels (n,) and probs (n, c) of a noisy classifier that is right more often than not."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += skill
    return labels, ev.softmax(logits)


def loop_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """The metrics one sample and one class at a time (tests/test_train.py's recompute)."""
    n, c = probs.shape
    pred = probs.argmax(1)
    rank = (-probs).argsort(1)
    topk = lambda k: float(np.mean([labels[i] in rank[i, :k] for i in range(n)]))  # noqa: E731
    f1 = []
    for k in range(c):
        tp = sum(1 for i in range(n) if pred[i] == k and labels[i] == k)
        fp = sum(1 for i in range(n) if pred[i] == k and labels[i] != k)
        fn = sum(1 for i in range(n) if pred[i] != k and labels[i] == k)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    cm = np.zeros((c, c))
    for t, p in zip(labels, pred):
        cm[t, p] += 1
    t, s, correct, total = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    denom = math.sqrt((total**2 - (s**2).sum()) * (total**2 - (t**2).sum()))
    return {"accuracy": float(np.mean(pred == labels)), "top3": topk(3), "top5": topk(5),
            "f1_macro": float(np.mean(f1)), "f1_per_class": f1,
            "mcc": (correct * total - (s * t).sum()) / denom if denom else 0.0}


@pytest.mark.parametrize("n, c, seed", [(300, 8, 0), (57, 3, 1), (1000, 8, 2)])
def test_point_metrics_equal_a_per_class_loop(n, c, seed):
    labels, probs = sample(n, c, seed)
    got, want = ev.point_metrics(labels, probs), loop_metrics(labels, probs)
    for k in ("accuracy", "top3", "top5", "f1_macro", "mcc"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert got["f1_per_class"] == pytest.approx(want["f1_per_class"], abs=1e-12)
    assert got["top5"] == (1.0 if c <= 5 else got["top5"])  # k = min(5, C)


def test_point_metrics_match_torchmetrics_including_an_absent_class():
    torch = pytest.importorskip("torch")
    from kvasir_dali.module import eval_metrics

    labels, probs = sample(200, 8, 5)
    # Class 7 neither occurs nor is predicted: torchmetrics leaves it out of the macro mean.
    keep = (labels != 7) & (probs.argmax(1) != 7)
    labels, probs = labels[keep], probs[keep]
    # Exact ties for the top class in ten rows: argmax takes the lower class index, as torch.
    top2 = np.sort(np.argsort(-probs[:10], 1)[:, :2], 1)
    rows = np.arange(10)[:, None]
    probs[rows, top2] = probs[rows, top2].mean(1, keepdims=True)
    got = ev.point_metrics(labels, probs)
    want = {k: v.item() for k, v in
            eval_metrics(8)(torch.from_numpy(probs).float(), torch.from_numpy(labels)).items()}
    for k in ("accuracy", "top3", "top5", "f1_macro", "mcc"):
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert got["f1_macro"] != pytest.approx(np.mean(got["f1_per_class"]))  # not over all 8


def test_bootstrap_ci_equals_a_simple_loop_over_the_same_index_draws():
    labels, probs = sample(150, 6, 3)
    resamples, seed = 300, 7
    ci = ev.bootstrap_ci(labels, probs, resamples=resamples, seed=seed)
    draws = np.random.default_rng(seed).integers(0, 150, size=(resamples, 150))
    per = [loop_metrics(labels[i], probs[i]) for i in draws]
    for k in ("accuracy", "top3", "top5", "f1_macro", "mcc"):
        want = np.percentile([m[k] for m in per], [2.5, 97.5])
        assert ci[k] == pytest.approx(want.tolist(), abs=1e-12), k
    f1 = np.array([m["f1_per_class"] for m in per])
    assert np.allclose(ci["f1_per_class"], np.percentile(f1, [2.5, 97.5], axis=0).T)
    assert ci["_meta"] == {"resamples": 300, "seed": 7, "level": 0.95, "method": "percentile"}
    point = ev.point_metrics(labels, probs)
    for k in ("accuracy", "top3", "f1_macro", "mcc"):
        assert ci[k][0] <= point[k] <= ci[k][1], k


def test_bootstrap_width_of_accuracy_is_the_normal_approximation_for_large_n():
    labels, probs = sample(5000, 4, 11, skill=1.5)
    p = ev.point_metrics(labels, probs)["accuracy"]
    lo, hi = ev.bootstrap_ci(labels, probs, resamples=1000, seed=1)["accuracy"]
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / 5000), rel=0.1)


def test_bootstrap_runs_fast_at_kvasir_test_size():
    import time

    labels, probs = sample(832, 8, 4)
    t = time.perf_counter()
    ev.bootstrap_ci(labels, probs)
    assert time.perf_counter() - t < 5.0  # about 0.1 s (vectorised); generous for busy CPUs


def test_ece_of_constructed_examples():
    # All confidences 0.9, 6 of 10 right: |0.6 - 0.9| = 0.3.
    labels = np.array([0] * 6 + [1] * 4)
    probs = np.tile([0.9, 0.1], (10, 1))
    assert ev.expected_calibration_error(labels, probs) == pytest.approx(0.3)
    # Two bins: 4 at 0.95 with 3 right (gap 0.2), 6 at 0.55 with 3 right (gap 0.05).
    probs = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 6)
    labels = np.array([0, 0, 0, 1, 0, 0, 0, 1, 1, 1])
    assert ev.expected_calibration_error(labels, probs) == pytest.approx(0.4 * 0.2 + 0.6 * 0.05)
    counts, acc, conf = ev.reliability_bins(labels, probs)
    assert counts.sum() == 10 and counts[14] == 4 and counts[8] == 6  # (0.533, 0.6] is bin 8


def test_reliability_diagram_is_a_small_png(tmp_path):
    labels, probs = sample(832, 8, 6)
    path = tmp_path / "reliability.png"
    ev.reliability_png(path, labels, probs, "fastvit_t8, test split")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150_000


def test_temperature_scaling_recovers_a_planted_temperature_and_keeps_predictions():
    rng = np.random.default_rng(0)
    n, c = 20000, 8
    true_logits = rng.normal(scale=1.5, size=(n, c))
    p = ev.softmax(true_logits)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)  # a label drawn from each row
    logits = true_logits * 3  # three times overconfident
    t = ev.fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    assert ev.nll(logits, labels, t) < ev.nll(logits, labels) - 0.1
    assert (ev.softmax(logits, t).argmax(1) == logits.argmax(1)).all()


def test_temperature_stays_finite_and_bounded_for_extreme_logits():
    labels, probs = sample(500, 8, 9, skill=0.5)
    huge = np.log(probs) * 1e6  # absurdly overconfident: T at its upper bound
    t = ev.fit_temperature(huge, labels)
    assert t == 20.0 and math.isfinite(ev.nll(huge, labels, t))
    assert np.isfinite(ev.softmax(huge)).all()
    perfect = np.eye(8)[labels] * 5.0  # always right: the NLL falls as T -> 0
    assert ev.fit_temperature(perfect, labels) == 0.05


def brute_mcnemar(b: int, c: int) -> float:
    """Two-sided: the probability of a split at least as uneven as (b, c) under Bin(b+c, 1/2)."""
    n = b + c
    return min(1.0, sum(math.comb(n, k) for k in range(n + 1) if min(k, n - k) <= min(b, c))
               / 2**n) if n else 1.0


def pairs(b: int, c: int, same: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Correctness arrays with b (A right, B wrong), c (A wrong, B right), `same` agreeing."""
    a = np.array([True] * b + [False] * c + [True] * same + [False] * same)
    return a, np.array([False] * b + [True] * c + [True] * same + [False] * same)


@pytest.mark.parametrize("b, c, p", [(0, 6, 0.03125), (6, 0, 0.03125), (4, 4, 1.0),
                                     (0, 0, 1.0), (10, 2, 0.03857421875)])
def test_mcnemar_exact_known_values(b, c, p):
    assert ev.mcnemar_exact(*pairs(b, c)) == {"b": b, "c": c, "p": pytest.approx(p, abs=1e-15)}


@pytest.mark.parametrize("b, c", [(1, 8), (7, 13), (30, 45), (52, 51)])
def test_mcnemar_exact_equals_a_brute_force_binomial_sum(b, c):
    assert ev.mcnemar_exact(*pairs(b, c))["p"] == pytest.approx(brute_mcnemar(b, c), rel=1e-12)


def test_mcnemar_exact_stays_accurate_for_thousands_of_discordant_pairs():
    b, c = 1500, 1400
    n = b + c
    log_terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                 - n * math.log(2) for k in range(c + 1)]
    want = 2 * math.fsum(math.exp(t) for t in log_terms)
    got = ev.mcnemar_exact(*pairs(b, c))["p"]
    assert 0 < got < 1 and got == pytest.approx(want, rel=1e-9)


def test_paired_bootstrap_difference_is_zero_for_identical_runs():
    labels, probs = sample(400, 8, 12)
    d = ev.paired_bootstrap_diff(labels, [probs, probs, probs], [probs, probs], resamples=500)
    for k in ("accuracy", "f1_macro"):
        assert d[k]["diff"] == pytest.approx(0, abs=1e-12)
        assert d[k]["ci"] == pytest.approx([0, 0], abs=1e-12)


def test_paired_bootstrap_difference_has_the_sign_of_the_better_configuration():
    labels, weak = sample(400, 8, 13, skill=1.0)
    strong = [sample(400, 8, s, skill=3.0)[1] for s in (14, 15)]
    # Same labels for every run: build the strong runs' probabilities around those labels.
    strong = [ev.softmax(np.log(p) + 3.0 * np.eye(8)[labels]) for p in strong]
    d = ev.paired_bootstrap_diff(labels, strong, [weak], resamples=500, seed=2)
    accs = [ev.point_metrics(labels, p)["accuracy"] for p in strong]
    assert d["accuracy"]["diff"] == pytest.approx(np.mean(accs) -
                                                  ev.point_metrics(labels, weak)["accuracy"])
    assert 0 < d["accuracy"]["ci"][0] < d["accuracy"]["diff"] < d["accuracy"]["ci"][1]
    assert d["f1_macro"]["ci"][0] > 0
    flipped = ev.paired_bootstrap_diff(labels, [weak], strong, resamples=500, seed=2)
    assert flipped["accuracy"]["diff"] == pytest.approx(-d["accuracy"]["diff"])
    assert flipped["accuracy"]["ci"] == pytest.approx([-d["accuracy"]["ci"][1],
                                                       -d["accuracy"]["ci"][0]])
