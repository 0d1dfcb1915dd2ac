"""The training augmentation recipe: one dataclass, shared by the DALI graph and the baselines.

No DALI here, so that the benchmark's PIL/albumentations and torchvision loaders apply the same
recipe on machines without DALI.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Augment:
    """Training augmentation, close to the reference's albumentations recipe.

    `scale` and `ratio` are RandomResizedCrop's (area fraction, aspect range). Each of
    `hflip`, `vflip`, `transpose` is applied with probability 0.5 (together: the 8 symmetries
    of the square). Rotation by U(-rotate, rotate) degrees happens with probability
    `rotate_p` and the colour jitter with `jitter_p`, as albumentations' p; jitter factors are
    U(1 - x, 1 + x), `hue` in degrees. Measured on 2 CPU threads the rotation and the colour
    jitter are the costliest steps after decode and resize, hence the probabilities.
    """

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip: bool = True
    transpose: bool = True
    rotate: float = 15.0
    rotate_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 5.0
    jitter_p: float = 0.5
    antialias: bool = True  # False: faster on CPU, some aliasing when shrinking large frames
