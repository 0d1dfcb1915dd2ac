"""`kvasir-train`: LightningCLI over KvasirClassifier and KvasirDataModule.

    kvasir-train fit --config configs/fastvit_t8.yaml --data.shards DIR
    kvasir-train test --config configs/fastvit_t8.yaml --data.shards DIR --ckpt_path PATH
    kvasir-train fit ... --ckpt_path last      # resume the newest run of this experiment
    kvasir-train preview --config CONFIG --data.shards DIR --out FILE.png   # augmentation grid

After `fit`, the best checkpoint (validation macro F1) is tested and the run directory gets
results.json, results.md, predictions.csv and the pictures (see report.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch/lightning touch anything: wandb never prompts and stays offline without a key.
if not os.environ.get("WANDB_API_KEY"):
    os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from .callbacks import Throughput  # noqa: E402
from .data import KvasirDataModule  # noqa: E402
from .module import KvasirClassifier  # noqa: E402
from .report import write_results  # noqa: E402


def _logger_dirs(trainer_cfg) -> list:
    loggers = trainer_cfg.get("logger")
    if not isinstance(loggers, list):
        loggers = [loggers]
    return [lg for lg in loggers if lg is not None and not isinstance(lg, bool)
            and "CSVLogger" in str(lg.get("class_path", ""))]


class KvasirCLI(LightningCLI):
    """Links the manifest's classes into the model and writes the report after fit/test."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.class_names", apply_on="instantiate")
        parser.link_arguments("model.model_name", "data.model_name")
        parser.link_arguments("model.channels_last", "data.channels_last")
        parser.link_arguments("data.image_size", "model.image_size")

    def before_instantiate_classes(self) -> None:
        """`--ckpt_path last`: find the newest last.ckpt of this experiment and continue its run."""
        cfg = self.config.get(self.subcommand)
        if cfg is None or cfg.get("ckpt_path") != "last":
            return
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
        raise SystemExit("kvasir-train: --ckpt_path last, but no last.ckpt was found under the "
                         "experiment's run folder; give a checkpoint path instead")

    def _report(self) -> None:
        trainer, model = self.trainer, self.model
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP
        if trainer.global_rank != 0 or not model.results:
            return
        rate = next((cb.epoch_rate for cb in trainer.callbacks if isinstance(cb, Throughput)),
                    None)
        out = write_results(run_dir, model.results, model.class_names,
                            model.hparams.model_name, "test", rate)
        print((run_dir / "results.md").read_text())
        print(f"kvasir-train: results in {run_dir} (accuracy {100 * out['accuracy']:.2f}%)")

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        ckpt = "best" if self.trainer.checkpoint_callback and \
            self.trainer.checkpoint_callback.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
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


def main(args: list[str] | None = None) -> None:
    """Entry point of `kvasir-train`."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["preview"]:
        _preview(argv[1:])
    else:
        _cli(args)


if __name__ == "__main__":
    main()
