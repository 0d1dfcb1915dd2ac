"""Class activation maps: where in an image a FastViT found the evidence for its prediction.

Grad-CAM (Selvaraju et al., 2017) through captum's `LayerGradCam`: the target layer's
activations A (N, K, h, w) are weighted by the spatial mean of d logit_c / dA and summed over
channels, ReLU'd, upsampled bilinearly to the input size and min-max normalized per image.
For FastViT the target is `final_conv`, whose output goes straight into global average
pooling and the linear classifier, so the gradient is the same at every position and
Grad-CAM equals the classic CAM (Zhou et al., 2016): sum_k w_ck A_k / (h w), exactly.

Works on the reparameterized model `kvasir-predict` uses (`timm.utils.reparameterize_model`
keeps `final_conv` as a module and the same function), with parameters that do or do not
require gradients, inside or outside `torch.no_grad()`/`torch.inference_mode()`; the model's
parameters, training flag and hooks are as before when a call returns.

Importing this module loads torch and numpy only: captum (which loads matplotlib.pyplot) when
maps are computed, matplotlib and PIL when they are drawn.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Target layer per model family: timm model-name prefix -> module path (longest prefix wins,
# so one variant can be given its own entry). `final_conv` is FastViT's last spatial layer:
# after it come only global average pooling and the classifier, so it holds the most
# class-specific evidence at the finest resolution the classifier sees: stride 32 for
# t8 ... ma36 and mci0-2 (12 x 12 cells at 384 px input, 32 px each), stride 64 for the
# five-stage mci3/mci4 (6 x 6). Every FastViT variant in timm has it, also reparameterized.
TARGET_LAYERS: dict[str, str] = {
    "fastvit_": "final_conv",
}
DPI = 84  # of the summary grid


@dataclass(frozen=True)
class CamEntry:
    """One image to draw: its name (a path; only the file name is shown), the model's view of
    it as uint8 (S, S, 3) RGB, its map (S, S) in [0, 1], the predicted class and probability."""

    name: str
    rgb: np.ndarray
    cam: np.ndarray
    pred: int
    prob: float


def target_layer(model: nn.Module, model_name: str) -> nn.Module:
    """The module of `model` whose output Grad-CAM uses, looked up in `TARGET_LAYERS`.

    `model_name` is the timm name, with or without a ".tag" ("fastvit_t8.apple_in1k").
    Raises ValueError for a family without an entry or a model without that module.
    """
    base = model_name.split(".", 1)[0].lower()
    prefixes = sorted((p for p in TARGET_LAYERS if base.startswith(p)), key=len, reverse=True)
    if not prefixes:
        raise ValueError(f"no class-activation-map target layer for model '{model_name}'; "
                         f"known families: {', '.join(sorted(TARGET_LAYERS))} (add one to "
                         "kvasir_dali.cam.TARGET_LAYERS)")
    path = TARGET_LAYERS[prefixes[0]]
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"model '{model_name}' has no module '{path}' to take class "
                         f"activation maps from ({type(model).__name__})") from exc


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics, no dropout) and no parameter gradients for the
    duration; the training flags and every parameter's requires_grad are restored after.

    Without parameter gradients autograd records nothing before the target layer (captum
    makes the layer's output require grad itself), so a map costs one inference's time and
    memory: FastViT-T8, 8 images of 384 px, 1.4 GB peak instead of 2.2 GB with them.
    """
    training = {m: m.training for m in model.modules()}
    requires = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in requires:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in requires:
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.training = flag


def _normalize(maps: torch.Tensor) -> torch.Tensor:
    """(N, S, S) maps >= 0 -> min-max scaled to [0, 1] per map. A map without contrast (all
    zero, or constant up to float32 rounding) carries no location and becomes all zero."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = hi - lo
    ok = (hi > 0) & (span > hi * 1e-5)
    scale = torch.where(ok, 1 / span.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)
    return (maps - lo[:, None, None]) * scale[:, None, None]


def class_activation_maps(model: nn.Module, model_name: str, images: torch.Tensor,
                          targets: Sequence[int], batch_size: int = 8) -> np.ndarray:
    """Grad-CAM maps of `targets` (one class index per image, normally the predicted class).

    Args:
        images: float32 (N, 3, S, S), normalized as the model expects; any device (moved to
            the model's).
        batch_size: images per forward and backward pass (bounds memory: about one
            inference batch of activations).
    Returns:
        float32 (N, S, S) on the CPU in [0, 1], 1 where the evidence for the class is
        strongest; an all-zero map where the layer holds no positive evidence for it.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, S, S), got {tuple(images.shape)}")
    targets = [int(t) for t in targets]
    if len(targets) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
    # Imported here: `captum.attr` imports matplotlib.pyplot (its visualization module), 0.4 s
    # that a caller which never draws maps (kvasir-predict without --cam) should not pay.
    from captum.attr import LayerAttribution, LayerGradCam

    size = tuple(images.shape[2:])  # (S, S) pixels
    grad_cam = LayerGradCam(model, target_layer(model, model_name))
    device = next(model.parameters()).device
    out = []
    # inference_mode(False): callers may be inside inference mode, where no graph is recorded
    # at all; captum's no_grad escape (set_grad_enabled) does not reach that far.
    with torch.inference_mode(False), _frozen_eval(model):
        for i in range(0, images.shape[0], batch_size):
            # clone(): a tensor made in inference mode cannot enter an autograd graph.
            x = images[i:i + batch_size].to(device, torch.float32).clone()
            attr = grad_cam.attribute(x, target=targets[i:i + batch_size],
                                      relu_attributions=True)  # (n, 1, S/32, S/32)
            up = LayerAttribution.interpolate(attr.detach(), size, interpolate_mode="bilinear")
            out.append(_normalize(up[:, 0].float()).cpu())
    if not out:
        return np.zeros((0, *size), np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def denormalize(images: torch.Tensor | np.ndarray, mean: Sequence[float],
                std: Sequence[float]) -> np.ndarray:
    """(N, 3, S, S) normalized float -> (N, S, S, 3) uint8 RGB: x * std + mean, clipped."""
    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else images
    x = np.asarray(x, np.float32) * np.asarray(std, np.float32)[:, None, None] \
        + np.asarray(mean, np.float32)[:, None, None]
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 (S, S, 3) image with the (S, S) map in [0, 1] blended over it in matplotlib's
    "jet" colour map (blue 0 ... red 1), opaque `alpha` where the map is 1."""
    import matplotlib

    if rgb.ndim != 3 or rgb.shape[2] != 3 or cam.shape != rgb.shape[:2]:
        raise ValueError(f"rgb (S, S, 3) and cam (S, S) must match: {rgb.shape}, {cam.shape}")
    m = np.clip(np.nan_to_num(np.asarray(cam, np.float32)), 0, 1)
    colour = matplotlib.colormaps["jet"](m)[..., :3].astype(np.float32) * 255  # (S, S, 3)
    # Opacity alpha/2 at 0 rising to alpha at 1: cold regions get a light blue tint instead of
    # none, because endoscopy images are mostly red and an untinted red region would read as
    # hot. jet rather than turbo: its cold end is a clear blue where turbo's is dark purple.
    a = alpha * (0.5 + 0.5 * m)[..., None]
    return (rgb.astype(np.float32) * (1 - a) + colour * a).round().astype(np.uint8)


def _safe_names(names: Sequence[str], reserved: frozenset[str] = frozenset({"cams"})) \
        -> list[str]:
    """File stems for `names`: ASCII letters, digits, '.', '-', '_' only, at most 80 chars,
    no Windows device name, unique even on case-insensitive file systems (a repeat gets "-2",
    "-3"...)."""
    used, out = set(reserved), []
    for name in names:
        stem = Path(name.replace("\\", "/")).stem
        stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:80] or "image"
        if re.fullmatch(r"(con|prn|aux|nul|com\d|lpt\d)(\..*)?", stem, re.IGNORECASE):
            stem = f"image_{stem}"
        candidate, n = stem, 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{stem}-{n}"
        used.add(candidate.lower())
        out.append(candidate)
    return out


def write_cams(out_dir: str | Path, entries: Sequence[CamEntry], classes: Sequence[str],
               per_class: int = 6) -> list[Path]:
    """One overlay PNG per entry (`<out_dir>/<safe name>.png`) and a summary `cams.png`: a row
    per predicted class that occurs (in class order), its first `per_class` images with their
    probability and file name. Returns the paths written, per-image PNGs first; none (and no
    cams.png) for no entries."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for entry, stem in zip(entries, _safe_names([e.name for e in entries])):
        path = out_dir / f"{stem}.png"
        Image.fromarray(overlay(entry.rgb, entry.cam)).save(path)
        paths.append(path)
    if entries:
        paths.append(_summary(out_dir / "cams.png", entries, classes, per_class))
    return paths


def _summary(path: Path, entries: Sequence[CamEntry], classes: Sequence[str],
             per_class: int) -> Path:
    """The grid behind `write_cams`: 1.5 inch cells (~125 px), 256-colour PNG as in preview:
    8 classes x 6 photos stay under ~400 KB."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry
    from PIL import Image

    rows = {c: [e for e in entries if e.pred == c] for c in sorted({e.pred for e in entries})}
    cols = min(per_class, max(len(v) for v in rows.values()))
    # constrained layout: leaves room for the title, captions and row labels
    fig = Figure(figsize=(1.5 * cols + 0.5, 1.68 * len(rows) + 0.3), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (c, members) in enumerate(rows.items()):
        label = classes[c] if 0 <= c < len(classes) else str(c)
        for k in range(cols):
            ax = axes[r, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(members):
                ax.axis("off")
                continue
            e = members[k]
            ax.imshow(overlay(e.rgb, e.cam))
            name = Path(e.name.replace("\\", "/")).name
            name = name if len(name) <= 20 else name[:9] + "…" + name[-10:]
            ax.set_title(f"{e.prob:.2f}  {name}", fontsize=6, pad=2)
        axes[r, 0].set_ylabel(f"{label}\n({len(members)} image{'s' * (len(members) != 1)})",
                              fontsize=7)
    fig.suptitle("Grad-CAM of the predicted class (red: strongest evidence; probability, file)",
                 fontsize=8)
    fig.savefig(path, dpi=DPI)
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(256, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    return path


class CamWriter:
    """`kvasir-predict --cam DIR`: per batch, the predicted class's map of every image as
    `DIR/<file name>.png`, written at once; `finish()` draws `DIR/cams.png`. Only the grid's
    images are kept (`per_class` per class), so memory does not grow with the inputs."""

    def __init__(self, out_dir: Path, predictor, per_class: int = 6) -> None:
        self.out_dir, self.predictor, self.per_class = Path(out_dir), predictor, per_class
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.used: set[str] = {"cams"}
        self.grid: list[CamEntry] = []
        self.written = 0

    def __call__(self, rows: list, images: torch.Tensor, probs: torch.Tensor) -> None:
        """The predictor's batch hook: rows (with .path), images (N, 3, S, S), probs (N, C)."""
        from PIL import Image

        pre, preds = self.predictor.pre, probs.argmax(1).tolist()
        maps = class_activation_maps(self.predictor.model, pre.model_name,
                                     images.float().cpu(), preds)
        rgb = denormalize(images.float().cpu(), pre.mean, pre.std)
        for row, picture, cam, pred, p in zip(rows, rgb, maps, preds, probs.tolist()):
            stem = _safe_names([row.path], frozenset(self.used))[0]
            self.used.add(stem.lower())
            Image.fromarray(overlay(picture, cam)).save(self.out_dir / f"{stem}.png")
            self.written += 1
            if sum(e.pred == pred for e in self.grid) < self.per_class:
                self.grid.append(CamEntry(row.path, picture, cam, pred, p[pred]))

    def finish(self) -> str:
        """Draw the summary grid; a line for the user."""
        if not self.grid:
            return f"no class-activation maps (nothing predicted) in {self.out_dir}"
        path = _summary(self.out_dir / "cams.png", self.grid, self.predictor.classes,
                        self.per_class)
        return f"{self.written} class-activation maps and {path}"
