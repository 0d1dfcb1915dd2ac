"""timm FastViT for classification: creation, preprocessing constants, weights, param groups.

Knows timm and torch, not Lightning. Pretrained weights come from a local file (any FastViT
checkpoint timm can read; a classifier of another class count is dropped), loaded weights-only:
no pickled code in a downloaded file runs. `hub` asks timm to download them (needs a network).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from shard_tools.errors import UserError


class WeightsError(UserError):
    """Pretrained weights could not be loaded; the message says how to give them."""


@dataclass(frozen=True)
class Preprocessing:
    """What timm's pretrained config says about the model's input and we use."""

    mean: tuple[float, float, float]  # of [0, 1] RGB pixels
    std: tuple[float, float, float]
    interpolation: str  # the resampling the weights were trained with (DALI resizes linearly)


def preprocessing(model_name: str) -> Preprocessing:
    """The model's preprocessing constants, from timm's pretrained config (no download)."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        raise UserError(f"timm knows no pretrained config for '{model_name}'; give a timm model "
                        "name such as fastvit_t8")
    return Preprocessing(tuple(cfg.mean), tuple(cfg.std), cfg.interpolation)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, weights only (no code runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a pickle with code, or not a weights file at all
        raise WeightsError(f"{path}: not loadable as plain weights ({type(exc).__name__}); "
                           "kvasir-dali never runs code from a weights file: give a "
                           ".safetensors file or a state dict saved with torch.save") from exc
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return timm.models.clean_state_dict(obj)


def create_model(name: str, num_classes: int, pretrained: str = "off", drop_path: float = 0.0,
                 grad_checkpointing: bool = False) -> nn.Module:
    """A timm model with a fresh `num_classes` head.

    Args:
        name: timm name, e.g. "fastvit_t8" ... "fastvit_ma36" (a ".tag" suffix picks weights).
        pretrained: "off"; "hub" (timm's download, needs a network); or a path to a weights
            file (.safetensors, .pth, .pth.tar), read weights-only and given to timm so that a
            classifier of another class count is dropped.
    """
    kw = {"num_classes": num_classes, "drop_path_rate": drop_path}
    if pretrained == "off":
        model = timm.create_model(name, pretrained=False, **kw)
    elif pretrained == "hub":
        model = _from_hub(name, kw)
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise WeightsError(f"pretrained weights file {path} not found; give 'off', 'hub' or "
                               "the path of a weights file")
        state = read_weights(path)
        try:
            model = timm.create_model(name, pretrained=True,
                                      pretrained_cfg_overlay={"state_dict": state}, **kw)
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"{path}: cannot load as '{name}' weights: {exc}") from exc
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _from_hub(name: str, kw: dict) -> nn.Module:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    try:
        return timm.create_model(name, pretrained=True, **kw)
    except Exception as exc:  # noqa: BLE001 - any hub failure gets the same advice
        raise WeightsError(
            f"could not fetch pretrained '{name}' weights from the hub ({type(exc).__name__}: "
            f"{exc}). Without a network, download the model's weights file "
            f"(e.g. model.safetensors of timm/{name}.apple_in1k) on another machine and "
            f"pass it: --model.pretrained /path/to/model.safetensors") from exc


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weights of 2+ dimensions only (not on norms, biases, scales)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
