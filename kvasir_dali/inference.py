"""A trained checkpoint as an inference model: weights-only load, FastViT reparameterization.

Torch and timm only (no Lightning, no DALI): `kvasir-predict` and `kvasir-export` start fast
and a consumer can load a model without the training stack. Everything a consumer needs to
preprocess an image (input size, mean, std) and to name the outputs (class names) travels in
`Preprocess`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from timm.utils import reparameterize_model
from torch import nn

from shard_tools.errors import UserError

from .model import create_model, preprocessing


class CheckpointError(UserError):
    """The checkpoint cannot be used for inference; the message names the file."""


@dataclass(frozen=True)
class Preprocess:
    """How inputs must look: RGB, resized to (image_size, image_size), (x/255 - mean) / std."""

    model_name: str
    classes: list[str]
    image_size: int  # pixels, square
    mean: tuple[float, float, float]  # of [0, 1] pixels
    std: tuple[float, float, float]

    def to_json(self) -> str:
        return json.dumps({"format": "kvasir-dali-model", **asdict(self),
                           "input": "float32 (N, 3, image_size, image_size), RGB, "
                                    "(pixel / 255 - mean) / std",
                           "output": "logits (N, num_classes) in the order of classes"})


def read_checkpoint(path: str | Path) -> dict:
    """A kvasir-train checkpoint's dict, loaded weights-only (no pickled code runs);
    CheckpointError naming the file when it is missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - unreadable for any reason: same advice
        raise CheckpointError(f"{path}: not a readable kvasir-train checkpoint "
                              f"({type(exc).__name__}); give a .ckpt written by kvasir-train "
                              "(files with pickled code are refused)") from exc
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= set(ckpt) \
            or "model_name" not in ckpt["hyper_parameters"]:
        raise CheckpointError(f"{path}: not a kvasir-train checkpoint (no model state and "
                              "hyper-parameters); give a .ckpt from a kvasir-train run folder")
    return ckpt


def load_checkpoint(path: str | Path, image_size: int | None = None,
                    fuse: bool = True) -> tuple[nn.Module, Preprocess]:
    """(model in eval mode, preprocessing) from a kvasir-train checkpoint.

    The EMA weights are used when the run kept them, as `kvasir-train test` does. `fuse`
    reparameterizes FastViT's train-time branches into single convolutions: the same
    function, fewer and cheaper layers.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    name, n = hp["model_name"], int(hp["num_classes"])
    classes = list(hp.get("class_names") or [str(i) for i in range(n)])
    model = create_model(name, n, pretrained="off")
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "model."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {name} with {n} classes (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    if fuse:
        model = reparameterize_model(model)
    norm = preprocessing(name)
    size = int(image_size or hp.get("image_size") or run_data_config(path).get("image_size")
               or 384)
    return model, Preprocess(name, classes, size, norm.mean, norm.std)


def run_data_config(ckpt: Path) -> dict:
    """The `data` section of the config.yaml that kvasir-train saved in the checkpoint's run
    folder (run/checkpoints/x.ckpt -> run/config.yaml); empty when there is none."""
    import yaml

    cfg = ckpt.parent.parent / "config.yaml"
    if not cfg.is_file():
        return {}
    try:
        return (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError):
        return {}
