"""`kvasir-train`: LightningCLI over KvasirClassifier and KvasirDataModule.

    kvasir-train fit --config configs/fastvit_t8.yaml --data.shards DIR
    kvasir-train fit --config fastvit_t8 --data.shards DIR      # a config shipped in the package
    kvasir-train test --config configs/fastvit_t8.yaml --data.shards DIR --ckpt_path PATH
    kvasir-train fit ... --ckpt_path last      # resume the newest run of this experiment
    kvasir-train preview --config CONFIG --data.shards DIR --out FILE.png   # augmentation grid

After `fit`, the best checkpoint (validation macro F1) is tested and the run directory gets
results.json, results.md, predictions.csv and the pictures (see report.py). Checkpoints are
loaded weights-only and only from local files. User errors print one line and exit 2; a failed
run leaves no empty run folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

# Before torch/lightning touch anything: wandb never prompts and stays offline without a key.
if not os.environ.get("WANDB_API_KEY"):
    os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from shard_tools.errors import Terminated, UserError, run_command  # noqa: E402

from .callbacks import Throughput  # noqa: E402
from .data import KvasirDataModule  # noqa: E402
from .inference import read_checkpoint  # noqa: E402
from .module import KvasirClassifier  # noqa: E402
from .report import RunInfo, write_results  # noqa: E402

# Lightning advertises its cloud logger at every start, and warns of its own use of a torch
# API torch deprecated: neither is a line a user of this tool can act on.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip"))
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

CONFIGS = Path(__file__).resolve().parent / "configs"  # in an installed wheel
if not CONFIGS.is_dir():  # a source checkout (editable install): the top-level folder
    CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def resolve_configs(argv: list[str]) -> list[str]:
    """`--config NAME` (no such file) -> the shipped configs/NAME.yaml, when there is one."""
    out = list(argv)
    for i, a in enumerate(out):
        value, eq = (out[i + 1], False) if a == "--config" and i + 1 < len(out) else \
            (a.split("=", 1)[1], True) if a.startswith("--config=") else (None, False)
        if value is None or Path(value).exists():
            continue
        for cand in (CONFIGS / value, CONFIGS / f"{value}.yaml"):
            if cand.is_file():
                if eq:
                    out[i] = f"--config={cand}"
                else:
                    out[i + 1] = str(cand)
                break
        else:
            names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
            raise UserError(f"--config {value}: no such file, and no shipped config of that "
                            f"name (shipped: {names})")
    return out


def _logger_dirs(trainer_cfg) -> list:
    loggers = trainer_cfg.get("logger")
    if not isinstance(loggers, list):
        loggers = [loggers]
    return [lg for lg in loggers if lg is not None and not isinstance(lg, bool)
            and "CSVLogger" in str(lg.get("class_path", ""))]


def _run_dir(trainer) -> Path:
    """This rank's view of the run folder, as `trainer.log_dir` finds it but without its
    broadcast: failure paths run on rank 0 alone, where a collective would wait forever."""
    lg = trainer.logger
    return Path(lg.log_dir if isinstance(lg, (CSVLogger, TensorBoardLogger)) else lg.save_dir)


class KvasirCLI(LightningCLI):
    """Links the manifest's classes into the model, guards checkpoint loading, writes the
    report after fit/test."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.class_names", apply_on="instantiate")
        parser.link_arguments("model.model_name", "data.model_name")
        parser.link_arguments("model.channels_last", "data.channels_last")
        parser.link_arguments("data.image_size", "model.image_size")

    def instantiate_trainer(self, **kwargs):
        if self.subcommand:  # user errors now, before the Trainer's start-up lines
            self.datamodule.check(self.subcommand)
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Resolve `last`, refuse URLs and unreadable files, load weights-only; then let
        Lightning read the checkpoint's hyper-parameters."""
        cfg = self.config.get(self.config.get("subcommand") or "")
        if cfg is not None and cfg.get("ckpt_path"):
            if cfg.ckpt_path == "last":
                self._resume_last(cfg)
            if "://" in str(cfg.ckpt_path):
                raise UserError(f"--ckpt_path {cfg.ckpt_path}: kvasir-train loads checkpoints "
                                "from local files only (a downloaded pickle could run code); "
                                "download it first and pass the file")
            read_checkpoint(cfg.ckpt_path)  # weights-only: corrupt, foreign, pickled code
            if cfg.get("weights_only") is False:
                raise UserError("--weights_only false is refused: checkpoints load weights-only")
            if "weights_only" in cfg:
                cfg.weights_only = True
        super()._parse_ckpt_path()

    def _resume_last(self, cfg) -> None:
        """`--ckpt_path last`: the newest last.ckpt of this experiment; continue its run."""
        for lg in _logger_dirs(cfg.trainer):
            root = Path(lg.init_args.save_dir) / lg.init_args.name
            found = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
            if found:
                cfg.ckpt_path = str(found[-1])
                run_dir = found[-1].parent.parent
                lg.init_args.version = run_dir.name
                # Keep the earlier session's log: the logger starts metrics.csv afresh.
                if (run_dir / "metrics.csv").exists():
                    n = len(list(run_dir.glob("metrics.part*.csv")))
                    (run_dir / "metrics.csv").rename(run_dir / f"metrics.part{n}.csv")
                print(f"kvasir-train: resuming {found[-1]}", file=sys.stderr)
                return
        raise UserError("--ckpt_path last, but no last.ckpt was found under the experiment's "
                        "run folder; give a checkpoint path instead")

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException as exc:
            self._remove_empty_run_dir()
            trainer = getattr(self, "trainer", None)
            # Lightning ends a Ctrl-C'd run with its graceful shutdown and sys.exit(1), and
            # passes SIGTERM on to shard_tools.errors' handler (Terminated).
            ctrl_c = isinstance(exc, SystemExit) and exc.code == 1 and trainer is not None \
                and trainer.interrupted
            if ctrl_c or isinstance(exc, Terminated):
                self._say_how_to_resume()
            if ctrl_c:  # ended like every kvasir command ends one: one line, exit 130
                raise KeyboardInterrupt from None
            raise

    def _say_how_to_resume(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.global_rank != 0 or self.subcommand != "fit" \
                or trainer.logger is None:
            return
        last = _run_dir(trainer) / "checkpoints" / "last.ckpt"
        if last.is_file():
            print(f"kvasir-train: {last} holds the last finished epoch; continue with "
                  "--ckpt_path last", file=sys.stderr)

    def _remove_empty_run_dir(self) -> None:
        """A run that failed before writing a checkpoint or results leaves no folder behind."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.global_rank != 0 or trainer.logger is None:
            return
        run_dir = _run_dir(trainer)
        if run_dir.is_dir() and not any(run_dir.rglob("*.ckpt")) \
                and not (run_dir / "results.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)

    def _report(self) -> None:
        trainer, model = self.trainer, self.model
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP
        if trainer.global_rank != 0 or not model.results:
            return
        speed = next((cb for cb in trainer.callbacks if isinstance(cb, Throughput)), None)
        cfg = self.config.get(self.subcommand) or {}
        info = RunInfo(model=model.hparams.model_name, split="test",
                       images_per_second=speed.epoch_rate if speed else None,
                       data_wait=speed.epoch_wait if speed else None,
                       seed=cfg.get("seed_everything"), fold=self.datamodule.fold,
                       image_size=self.datamodule.image_size,
                       pretrained=str(model.hparams.pretrained),
                       params=sum(p.numel() for p in model.model.parameters()))
        out = write_results(run_dir, model.results, model.class_names, info,
                            self.datamodule.shard_set)
        print((run_dir / "results.md").read_text())
        print(f"kvasir-train: results in {run_dir} (accuracy {100 * out['accuracy']:.2f}%)")

    def _best_checkpoint(self) -> str | None:
        """The best checkpoint's path, found in this run folder when the folder was moved
        since the checkpoint was recorded (resume of a moved run)."""
        cb = self.trainer.checkpoint_callback
        if not cb or not cb.best_model_path:
            return None
        best = Path(cb.best_model_path)
        if not best.is_file() and cb.dirpath:
            best = Path(cb.dirpath) / best.name
        return str(best) if best.is_file() else None

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        self.trainer.test(self.model, datamodule=self.datamodule,
                          ckpt_path=self._best_checkpoint(), weights_only=True)
        self._report()

    def after_test(self) -> None:
        self._report()


def _preview(args: list[str]) -> None:
    """`preview`: the experiment's data settings, the CPU graph, no training."""
    import argparse

    from .preview import preview

    ap = argparse.ArgumentParser(prog="kvasir-train preview", add_help=False)
    ap.add_argument("--out", default="preview.png")
    ap.add_argument("--samples", type=int, default=8, help="rows: samples of distinct classes")
    ap.add_argument("--versions", type=int, default=5, help="augmented versions per sample")
    own, rest = ap.parse_known_args(args)
    cli = _cli(rest + ["--trainer.accelerator", "cpu", "--trainer.devices", "1",
                       "--trainer.precision", "32-true", "--trainer.logger", "false"], run=False)
    cli.datamodule.device = "cpu"
    out = preview(cli.datamodule, own.out, own.samples, own.versions)
    print(f"kvasir-train: wrote {out}")


def _cli(args: list[str] | None, run: bool = True) -> KvasirCLI:
    return KvasirCLI(
        KvasirClassifier, KvasirDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "num_sanity_val_steps": 0,  # DALI epochs cannot be partly consumed and reset
            "use_distributed_sampler": False,  # DALI shards by rank itself
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": "runs", "name": "kvasir"}},
            "callbacks": [
                # The best by validation macro F1 (first: trainer.checkpoint_callback is this).
                ModelCheckpoint(monitor="val/f1_macro", mode="max",
                                filename="best-epoch{epoch:02d}", auto_insert_metric_name=False),
                # last.ckpt after every epoch. Not `save_last=True` above: Lightning 2.6 writes
                # that copy only in epochs whose metric improved, so a resume repeated epochs.
                ModelCheckpoint(monitor=None, save_top_k=1, filename="last",
                                enable_version_counter=False),
                LearningRateMonitor(logging_interval="epoch"),
                Throughput(),
            ],
        },
        args=args,
        run=run,
    )


def _main(argv: list[str]) -> int:
    argv = resolve_configs(argv)
    try:
        if argv[:1] == ["preview"]:
            _preview(argv[1:])
        else:
            # Through sys.argv, as LightningCLI expects: DDP re-launches the other ranks with it.
            sys.argv = [sys.argv[0], *argv]
            _cli(None)
    except MisconfigurationException as exc:  # Lightning's word for a bad option value
        raise UserError(str(exc).strip().splitlines()[0]) from exc
    return 0


def main(args: list[str] | None = None) -> int:
    """Entry point of `kvasir-train`."""
    return run_command("kvasir-train", _main, sys.argv[1:] if args is None else args)


if __name__ == "__main__":
    sys.exit(main())
