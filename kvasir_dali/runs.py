"""The run folders `kvasir-report` compares: read, checked, grouped into configurations.

See leaderboard.py for what a configuration, a recipe and a test split are. Every problem with
a folder is a `ReportError` naming the file and what to do.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shard_tools.errors import UserError

from . import evidence

# Config keys (dotted paths) that vary between repeats of one experiment: left out of the recipe.
VARYING_KEYS = ("seed_everything", "data.seed", "data.fold", "data.shards", "ckpt_path",
                "trainer.logger", "trainer.callbacks", "trainer.default_root_dir",
                "trainer.enable_progress_bar", "data.num_threads")
METRICS = ("accuracy", "f1_macro", "top3", "top5", "mcc", "ece")
REQUIRED = ("accuracy", "f1_macro", "top3", "top5", "mcc")  # in every results.json
PROG = "kvasir-report"


class ReportError(UserError):
    """A run folder or option that cannot be reported; the message says which and why."""


@dataclass
class Run:
    """One run folder: its files, read and checked."""

    dir: Path
    results: dict
    config: dict
    keys: np.ndarray  # (n,) sample keys (str), sorted
    labels: np.ndarray  # (n,) int
    probs: np.ndarray  # (n, C) float
    classes: list[str]
    seed: int | None = None
    fold: int | None = None
    test_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # METRICS, fractions

    def __post_init__(self) -> None:
        self.metrics = {k: float(self.results[k]) for k in REQUIRED}
        ece = self.results.get("ece")  # older runs lack it: the same ECE from the predictions
        self.metrics["ece"] = float(ece) if ece is not None else \
            evidence.expected_calibration_error(self.labels, self.probs)

    @property
    def correct(self) -> np.ndarray:
        return self.probs.argmax(1) == self.labels


@dataclass
class Config:
    """Runs of one configuration on one test split, sorted by (seed, fold, folder)."""

    name: str
    recipe: str
    model: str
    image_size: int | None
    pretrained: str
    test_id: str
    runs: list[Run] = field(default_factory=list)
    ci: dict = field(default_factory=dict)  # evidence.runs_mean_ci of the runs

    @property
    def label(self) -> str:
        return f"{self.name} ({self.recipe})"

    def stat(self, metric: str) -> tuple[float, float | None]:
        """(mean, sample std or None with one run) over the runs."""
        v = np.array([r.metrics[metric] for r in self.runs])
        return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)

    @property
    def images_per_second(self) -> float | None:
        v = [r.results.get("train_images_per_second") for r in self.runs]
        v = [float(x) for x in v if x is not None]
        return float(np.mean(v)) if v else None

    @property
    def params(self) -> int | None:
        return next((int(r.results["params"]) for r in self.runs
                     if r.results.get("params") is not None), None)


# -- reading ---------------------------------------------------------------------------------
def find_run_dirs(paths: list[str]) -> list[Path]:
    """Run folders (holding results.json) given directly or found below the given folders."""
    found: dict[Path, Path] = {}  # resolved -> as given: each run once, named as the user did
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p} does not exist; pass run folders written by kvasir-train "
                              "or folders above them")
        if p.is_file():
            raise ReportError(f"{p} is a file; pass its run folder ({p.parent}) instead")
        dirs = [p] if (p / "results.json").is_file() else \
            sorted(f.parent for f in p.rglob("results.json"))
        if not dirs:
            raise ReportError(f"no run folder (one holding results.json) in {p}; run "
                              "`kvasir-train fit` or `kvasir-train test` first, or pass the "
                              "folder that holds the runs")
        for d in dirs:
            found.setdefault(d.resolve(), d)
    return list(found.values())


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ReportError(f"{path} is unreadable ({short(e)}); restore the run's "
                          "config.yaml") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} is not a config mapping; restore the run's config.yaml")
    return data


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ReportError(f"{path} is unreadable ({short(e)}); rerun `kvasir-train test` "
                          "for this run") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} is not a results object; rerun `kvasir-train test`")
    missing = [k for k in REQUIRED if not _number(data.get(k))]
    if missing:
        raise ReportError(f"{path} lacks {', '.join(missing)}; rerun `kvasir-train test` for "
                          "this run")
    wrong = [k for k in ("ece", "train_images_per_second", "params")
             if data.get(k) is not None and not _number(data[k])]
    if wrong:
        raise ReportError(f"{path}: {', '.join(wrong)} must be numbers or null; rerun "
                          "`kvasir-train test` for this run")
    return data


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                           list[str]]:
    """(keys, labels, preds, probs, classes) of predictions.csv, sorted by key."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReportError(f"{path} is unreadable ({short(e)}); rerun `kvasir-train test` "
                          "for this run") from None
    head = rows[0] if rows else []
    classes = [c[2:] for c in head[3:]]
    if head[:3] != ["key", "label", "pred"] or not classes or \
            not all(c.startswith("p_") for c in head[3:]):
        raise ReportError(f"{path} does not start with the header key,label,pred,p_<class>...; "
                          "rerun `kvasir-train test` for this run")
    if len(rows) < 2:
        raise ReportError(f"{path} holds no predictions; rerun `kvasir-train test`")
    try:
        body = rows[1:]
        if any(len(r) != len(head) for r in body):
            raise ValueError("a row has the wrong number of fields")
        keys = np.array([r[0] for r in body])
        labels = np.array([int(r[1]) for r in body])
        preds = np.array([int(r[2]) for r in body])
        probs = np.array([[float(v) for v in r[3:]] for r in body])
    except ValueError as e:
        raise ReportError(f"{path}: {short(e)}; rerun `kvasir-train test` for this run") \
            from None
    c = len(classes)
    if not (np.isfinite(probs).all() and ((labels >= 0) & (labels < c)).all()
            and ((preds >= 0) & (preds < c)).all()):
        raise ReportError(f"{path} holds labels, predictions or probabilities out of range; "
                          "rerun `kvasir-train test` for this run")
    order = np.argsort(keys, kind="stable")
    return keys[order], labels[order], preds[order], probs[order], classes


def load_run(run_dir: Path) -> Run:
    """Read and check one run folder."""
    for name in ("results.json", "predictions.csv", "config.yaml"):
        if not (run_dir / name).is_file():
            raise ReportError(f"{run_dir / name} is missing; pass folders written by "
                              "kvasir-train after its test (`kvasir-train test ... "
                              "--ckpt_path CKPT` writes results.json and predictions.csv)")
    results = _read_json(run_dir / "results.json")
    config = _read_yaml(run_dir / "config.yaml")
    keys, labels, preds, probs, classes = _read_predictions(run_dir / "predictions.csv")
    # predictions.csv rounds probabilities to 1e-6: where that made a tie the argmax may
    # disagree with the trainer's `pred`; a nudge far below the rounding keeps `pred` on top.
    rows = np.flatnonzero(probs.argmax(1) != preds)
    probs[rows, preds[rows]] += 1e-9
    n = len(labels)
    acc = float((preds == labels).mean())
    if abs(acc - float(results["accuracy"])) > 0.5 / n + 1e-6:
        raise ReportError(f"{run_dir}: results.json says accuracy {results['accuracy']:.6f} "
                          f"but predictions.csv gives {acc:.6f}: the files are not from the "
                          "same test; rerun `kvasir-train test` for this run")
    seed = results.get("seed")
    seed = config.get("seed_everything") if seed is None else seed
    fold = results.get("fold")
    fold = _section(config, "data").get("fold") if fold is None else fold
    return Run(run_dir, results, config, keys, labels, probs, classes,
               seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
               fold=fold if isinstance(fold, int) and not isinstance(fold, bool) else None)


def _section(config: dict, name: str) -> dict:
    """config[name] when it is a mapping, else {} (hand-edited or older configs)."""
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def short(e: Exception) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__


# -- configurations --------------------------------------------------------------------------
def recipe(config: dict) -> tuple[str, str]:
    """(8-hex hash of the config without VARYING_KEYS, readable name from trainer.logger)."""
    cfg = json.loads(json.dumps(config, default=str))  # a deep copy in plain JSON types
    for dotted in VARYING_KEYS:
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8], _logger_name(config)


def _logger_name(config: dict) -> str:
    loggers = _section(config, "trainer").get("logger")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(lg, dict) and (lg.get("init_args") or {}).get("name"):
            return str(lg["init_args"]["name"])
    return str(_section(config, "model").get("model_name", "run"))


def _samples_hash(run: Run) -> str:
    text = "\n".join(f"{k},{y}" for k, y in zip(run.keys.tolist(), run.labels.tolist()))
    return hashlib.sha256(text.encode()).hexdigest()


def assign_test_ids(runs: list[Run]) -> str:
    """Set every run's test_id; return which identifier was used (for the report)."""
    if all(isinstance(r.results.get("test_samples_sha256"), str) for r in runs):
        for r in runs:
            r.test_id = r.results["test_samples_sha256"]
        return "results.json test_samples_sha256"
    for r in runs:
        r.test_id = _samples_hash(r)
    return "SHA-256 of predictions.csv's (key, label) list"


def check_test_splits(runs: list[Run], allow_different: bool) -> None:
    """Refuse runs of different test splits (unless allowed) or inconsistent sample lists."""
    splits: dict[str, list[Run]] = {}
    for r in runs:
        splits.setdefault(r.test_id, []).append(r)
    if len(splits) > 1 and not allow_different:
        parts = "; ".join(f"split {sid[:8]} ({len(rs[0].labels)} samples): "
                          + ", ".join(str(r.dir) for r in rs) for sid, rs in splits.items())
        raise ReportError(f"the runs were tested on {len(splits)} different test splits, "
                          f"which cannot be compared: {parts}; pass runs of one split, or "
                          "--allow-different-tests to compare only within equal splits")
    for sid, rs in splits.items():
        first = rs[0]
        for r in rs[1:]:
            if r.classes != first.classes or not np.array_equal(r.keys, first.keys) or \
                    not np.array_equal(r.labels, first.labels):
                raise ReportError(f"{first.dir} and {r.dir} have the same test split id "
                                  f"{sid[:8]} but their predictions.csv list different "
                                  "samples, labels or classes; rerun `kvasir-train test` for "
                                  "them")


def group(runs: list[Run]) -> list[Config]:
    """Configurations, ranked by mean accuracy (then macro F1), best first."""
    configs: dict[tuple, Config] = {}
    for r in runs:
        h, name = recipe(r.config)
        model_cfg, data_cfg = _section(r.config, "model"), _section(r.config, "data")
        model = str(_first(r.results.get("model"), model_cfg.get("model_name"), "?"))
        size = _first(r.results.get("image_size"), data_cfg.get("image_size"))
        pre = str(_first(r.results.get("pretrained"), model_cfg.get("pretrained"), "?"))
        key = (model, size, pre, h, r.test_id)
        configs.setdefault(key, Config(name, h, model, size, pre, r.test_id)).runs.append(r)
    for c in configs.values():
        c.runs.sort(key=lambda r: (r.seed is None, r.seed or 0, r.fold is None, r.fold or 0,
                                   str(r.dir)))
    return sorted(configs.values(), key=lambda c: (-c.stat("accuracy")[0],
                                                   -c.stat("f1_macro")[0], c.label))


def _first(*values: object) -> object:
    """The first value that is not None (results.json's, else config.yaml's)."""
    return next((v for v in values if v is not None), None)


def compare(a: Config, b: Config, resamples: int, seed: int) -> dict:
    """Paired bootstrap difference (A - B) and exact McNemar on pooled run pairs."""
    labels = a.runs[0].labels
    boot = evidence.paired_bootstrap_diff(labels, [r.probs for r in a.runs],
                                          [r.probs for r in b.runs], resamples, seed)
    pairs = min(len(a.runs), len(b.runs))
    mc = evidence.mcnemar_exact(np.concatenate([r.correct for r in a.runs[:pairs]]),
                                np.concatenate([r.correct for r in b.runs[:pairs]]))
    return {"a": a, "b": b, "pairs": pairs, "bootstrap": boot, "mcnemar": mc}
