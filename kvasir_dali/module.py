"""`KvasirClassifier`: the LightningModule around a timm FastViT.

Lightning owns precision (fp16 autocast + scaler), DDP and the loop; this file holds the step,
the optimizer and schedule, and the metrics (torchmetrics objects, correct under DDP).
Evaluation batches are `(images, labels, keys)`; test logits are kept per sample so that
`report.py` can write predictions.csv and compute intervals and calibration. With `calibrate`,
a temperature is fitted on the validation split before testing (`evidence.fit_temperature`):
test probabilities are softmax(logits / T), the same ranking, so accuracy does not change.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
    MulticlassPrecision,
    MulticlassRecall,
)

from .model import create_model, param_groups


def eval_metrics(num_classes: int) -> MetricCollection:
    """Scalar metrics: plain (micro) top-k accuracy over samples, macro F1, MCC.

    compute_groups=False: torchmetrics otherwise merges metrics whose states happen to be equal
    after the first batch (top-1 and top-3 when the first batch is all right at top-1) and
    from then on reports one for both: top-3 then equals accuracy.
    """
    c = num_classes
    return MetricCollection({
        "accuracy": MulticlassAccuracy(c, average="micro"),
        "top3": MulticlassAccuracy(c, top_k=min(3, c), average="micro"),
        "top5": MulticlassAccuracy(c, top_k=min(5, c), average="micro"),
        "f1_macro": MulticlassF1Score(c, average="macro"),
        "mcc": MulticlassMatthewsCorrCoef(c),
    }, compute_groups=False)


def class_metrics(num_classes: int) -> MetricCollection:
    """Per-class precision/recall/F1 and the confusion matrix (rows: true, columns: predicted)."""
    c = num_classes
    return MetricCollection({
        "precision": MulticlassPrecision(c, average=None),
        "recall": MulticlassRecall(c, average=None),
        "f1": MulticlassF1Score(c, average=None),
        "confusion": MulticlassConfusionMatrix(c),
    }, compute_groups=False)


class KvasirClassifier(L.LightningModule):
    """FastViT classifier.

    Args:
        model_name: timm model name (fastvit_t8 ... fastvit_ma36).
        num_classes: linked from the data's manifest by the CLI.
        class_names: linked from the manifest; stored in checkpoints for predict and export.
        pretrained: "off", "hub" or a path to a weights file.
        lr: peak AdamW learning rate; warmup then cosine to lr * min_lr_ratio, per step.
        weight_decay: on weights of 2+ dimensions only.
        warmup_epochs: linear warmup length (fractions allowed).
        label_smoothing: cross-entropy label smoothing.
        drop_path: stochastic depth rate.
        ema_decay: >0 keeps an exponential moving average of the weights, used for evaluation.
        grad_checkpointing: recompute activations in backward (bigger models in less memory).
        channels_last: NHWC memory format for the model (pair with data.channels_last).
        compile: torch.compile the model.
        max_nonfinite: consecutive non-finite losses after which training stops.
        image_size: the input side the model is trained at (linked from data.image_size); kept
            in checkpoints for kvasir-predict and kvasir-export.
        calibrate: fit a temperature on the validation split before testing; test
            probabilities (predictions.csv) are then calibrated, and results.json says so.
    """

    def __init__(self, model_name: str = "fastvit_t8", num_classes: int = 8,
                 class_names: list[str] | None = None, pretrained: str = "off",
                 lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: float = 1.0,
                 min_lr_ratio: float = 0.01, label_smoothing: float = 0.1,
                 drop_path: float = 0.0, ema_decay: float = 0.0,
                 grad_checkpointing: bool = False, channels_last: bool = False,
                 compile: bool = False, max_nonfinite: int = 20,
                 image_size: int = 384, calibrate: bool = False) -> None:
        super().__init__()
        # `calibrate` is a test-time choice: kept out of checkpoints, so that a checkpoint's
        # hyper-parameters (which LightningCLI applies with --ckpt_path) do not override it.
        self.save_hyperparameters(ignore=["calibrate"])
        self.calibrate = calibrate
        self.class_names = list(class_names or [str(i) for i in range(num_classes)])
        self.model = create_model(model_name, num_classes, pretrained, drop_path,
                                  grad_checkpointing)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = None
        if ema_decay > 0:  # a copy made before compiling: evaluation runs it uncompiled
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=ema_decay)
        if compile:  # in place: the state dict keeps its `model.` keys, so checkpoints load
            self.model.compile()  # with compile on or off alike
        self.temperature: float | None = None  # fitted on validation when `calibrate`
        self.calibration: dict | None = None  # what the fit found (results.json)
        self.val_metrics = eval_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = eval_metrics(num_classes).clone(prefix="test/")
        self.test_classes = class_metrics(num_classes)  # per class: reported for the test only
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self._nonfinite = 0
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # keys,
        # labels, logits (N, C) float32 on the CPU
        self.results: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (N, 3, S, S) -> logits (N, C)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            # Under 16-mixed the scaler skips the step; a run that stays non-finite is broken.
            self._nonfinite += 1
            if self._nonfinite >= self.hparams.max_nonfinite:
                raise RuntimeError(
                    f"loss was non-finite for {self._nonfinite} steps in a row (epoch "
                    f"{self.current_epoch}, step {self.global_step}); stopping before writing "
                    "broken checkpoints. Lower --model.lr, or use --trainer.precision bf16-mixed")
            if self.trainer.world_size == 1:
                return None  # skip this step (with DDP every rank must step together)
        else:
            self._nonfinite = 0
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(y))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_epochs * total / max(1, self.trainer.max_epochs or 1))

        def factor(step: int) -> float:  # multiplies lr: linear warmup, then cosine decay
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, total - warmup)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation -------------------------------------------------------------------------
    def _eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        model = self.ema.module if self.ema is not None else self.model
        return model(x).float()

    def _eval_step(self, batch, metrics, loss_metric, classes=None):
        x, y = batch[0], batch[1]
        logits = self._eval_logits(x)
        scaled = logits / (self.temperature or 1.0)
        loss = F.cross_entropy(scaled, y)  # plain CE (no smoothing): comparable to the reference
        probs = scaled.softmax(-1)
        metrics.update(probs, y)
        if classes is not None:
            classes.update(probs, y)
        loss_metric.update(loss, weight=len(y))
        return logits

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.val_metrics.reset()
        self.val_loss.reset()

    def test_step(self, batch, batch_idx):
        logits = self._eval_step(batch, self.test_metrics, self.test_loss, self.test_classes)
        self.test_outputs.append((batch[2].detach().cpu(), batch[1].detach().cpu(),
                                  logits.detach().cpu()))

    def on_test_epoch_start(self) -> None:
        self.test_outputs = []
        self.temperature = None
        if self.calibrate:
            self._fit_temperature()

    @torch.no_grad()
    def _fit_temperature(self) -> None:
        """T minimising the validation NLL (all ranks' samples; every rank fits the same T)."""
        from .evidence import fit_temperature, nll

        outs = []
        for x, y, keys in self.trainer.datamodule.val_dataloader():
            outs.append((keys.cpu(), y.cpu(), self._eval_logits(x.to(self.device)).cpu()))
        keys, labels, logits = self._gather_predictions(*(torch.cat(t) for t in zip(*outs)))
        z, y = logits.double().numpy(), labels.numpy()
        self.temperature = fit_temperature(z, y)
        self.calibration = {"temperature": self.temperature, "fitted_on": "val",
                            "val_samples": len(y), "val_nll_before": nll(z, y),
                            "val_nll_after": nll(z, y, self.temperature)}

    def on_test_epoch_end(self) -> None:
        scalars = {k: v.item() for k, v in self.test_metrics.compute().items()}
        scalars["test/loss"] = self.test_loss.compute().item()
        per_class = {k: v.cpu() for k, v in self.test_classes.compute().items()}
        self.log_dict(scalars)
        keys, labels, logits = self._gather_predictions(
            *(torch.cat(t) for t in zip(*self.test_outputs)))
        self.results = {"scalars": scalars, "per_class": per_class,
                        "predictions": (keys, labels, (logits / (self.temperature or 1.0))
                                        .softmax(-1)),
                        "uncalibrated": logits.softmax(-1),
                        "calibration": self.calibration if self.temperature else None}
        self.test_metrics.reset()
        self.test_classes.reset()
        self.test_loss.reset()

    def _gather_predictions(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Concatenate per-rank predictions (ranks may hold different counts)."""
        if self.trainer.world_size == 1:
            return tensors
        n = torch.tensor([len(tensors[0])], device=self.device)
        counts = self.all_gather(n).view(-1).tolist()
        out = []
        for t in tensors:
            padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=self.device)
            padded[: len(t)] = t.to(self.device)
            gathered = self.all_gather(padded)  # (world, max, ...)
            out.append(torch.cat([gathered[r, :c] for r, c in enumerate(counts)]).cpu())
        return tuple(out)
