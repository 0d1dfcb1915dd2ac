"""Shared fixtures: data sets the tests build themselves (no downloads, no real Kvasir).

Markers (pyproject): `gpu` tests need CUDA and skip with the reason elsewhere (CI has none);
`slow` tests start several processes.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from shard_tools.build import BuildSpec, build
from shard_tools.synth import synth


def jpeg_bytes(size=(96, 80), color=(180, 60, 50), **save) -> bytes:
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 7):  # some structure so hashes differ between colours
        img.putpixel((x, x % size[1]), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic Kvasir-layout set: 8 classes x 12 images, mixed resolutions."""
    out = tmp_path_factory.mktemp("synth")
    synth(out, per_class=12, seed=3, workers=2)
    return out


@pytest.fixture(scope="session")
def shards(synth_dir, tmp_path_factory) -> Path:
    """Shards of `synth_dir`, small shard size so that every split has several tars."""
    out = tmp_path_factory.mktemp("shards") / "out"
    build(BuildSpec(src=str(synth_dir), out=str(out), shard_bytes=1_500_000, workers=2,
                    val_fraction=0.25, test_fraction=0.25))
    return out
