"""timm FastViT for classification: creation, pretrained weights, optimizer parameter groups.

Knows timm and torch, not Lightning. Pretrained weights come from a local file (any FastViT
checkpoint timm can read; a 1000-class head is dropped) or, on request, from the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
from torch import nn


class WeightsError(RuntimeError):
    """Pretrained weights could not be loaded; the message says how to give them."""


def create_model(name: str, num_classes: int, pretrained: str = "off", drop_path: float = 0.0,
                 grad_checkpointing: bool = False) -> nn.Module:
    """A timm model with a fresh `num_classes` head.

    Args:
        name: timm name, e.g. "fastvit_t8" ... "fastvit_ma36" (a ".tag" suffix picks weights).
        pretrained: "off"; "hub" (timm's download, needs a network); or a path to a weights
            file (.safetensors, .pth, .pth.tar), loaded through timm so the classifier of
            another class count is dropped.
    """
    kw = {"num_classes": num_classes, "drop_path_rate": drop_path}
    if pretrained == "off":
        model = timm.create_model(name, pretrained=False, **kw)
    elif pretrained == "hub":
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")
        try:
            model = timm.create_model(name, pretrained=True, **kw)
        except Exception as exc:  # noqa: BLE001 - any hub failure gets the same advice
            raise WeightsError(
                f"could not fetch pretrained '{name}' weights from the hub ({type(exc).__name__}: "
                f"{exc}). Without a network, download the model's weights file "
                f"(e.g. model.safetensors of timm/{name}.apple_in1k) on another machine and "
                f"pass it: --model.pretrained /path/to/model.safetensors") from exc
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise WeightsError(f"pretrained weights file {path} not found; give 'off', 'hub' or "
                               "the path of a weights file")
        try:
            model = timm.create_model(name, pretrained=True,
                                      pretrained_cfg_overlay={"file": str(path)}, **kw)
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"{path}: cannot load as '{name}' weights: {exc}") from exc
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weights of 2+ dimensions only (not on norms, biases, scales)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
