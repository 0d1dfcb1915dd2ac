"""Shared fixtures: data sets the tests build themselves (no downloads, no real Kvasir).

Markers (pyproject): `gpu` tests need CUDA and skip with the reason elsewhere (CI has none);
`slow` tests start several processes.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from shard_tools.build import BuildSpec, build
from shard_tools.synth import synth
from tests.helpers import FAST, SMOKE, train

# The tools remember verified shards per user; the tests keep that memory to themselves.
os.environ["KVASIR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvasir-test-cache-")

# Tests send SIGINT as a terminal's Ctrl-C would. A test run started in the background by a
# non-interactive shell (`cmd &`) inherits SIGINT ignored, and so would every tool it starts:
# an ignored signal survives exec, a handled one is reset to the default there.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture(scope="session")
def fitted(shards, tmp_path_factory) -> Path:
    """The run folder of one short fit (which then tests the best checkpoint), real CLI."""
    cwd = tmp_path_factory.mktemp("fit")
    train(["fit", "--config", SMOKE, "--data.shards", str(shards), "--trainer.max_epochs", "2",
           *FAST], cwd)
    return cwd / "runs" / "cpu_smoke" / "version_0"


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (120, 60), (200, 80, 70))
    img.paste((20, 20, 200), (0, 0, 30, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _absurd_size() -> bytes:
    data = bytearray(jpeg_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width
    return bytes(data)


@pytest.fixture
def hostile(tmp_path) -> Path:
    root = tmp_path / "hostile"
    a, b = root / "alpha", root / "beta gamma"
    a.mkdir(parents=True)
    b.mkdir()
    good = jpeg_bytes(color=(190, 70, 60))
    (a / "plain.jpg").write_bytes(good)
    (a / "copy of plain.JPG").write_bytes(good)  # exact duplicate, odd name
    (a / "x.y.z.jpeg").write_bytes(jpeg_bytes(color=(30, 160, 40)))
    (a / "ünïcode.jpg").write_bytes(jpeg_bytes(color=(20, 30, 200)))
    (a / "progressive.jpg").write_bytes(jpeg_bytes(color=(120, 120, 20), progressive=True))
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 120, 120, 0)).save(cmyk, "JPEG")
    (b / "cmyk.jpg").write_bytes(cmyk.getvalue())
    gray = io.BytesIO()
    Image.new("L", (64, 48), 90).save(gray, "JPEG")
    (b / "gray.jpg").write_bytes(gray.getvalue())
    png = io.BytesIO()
    Image.new("RGBA", (50, 40), (10, 200, 10, 128)).save(png, "PNG")
    (b / "really_png.jpg").write_bytes(png.getvalue())
    (b / "rotated.jpg").write_bytes(_exif_rotated())
    (b / "truncated.jpg").write_bytes(jpeg_bytes()[:300])
    (b / "empty.jpg").write_bytes(b"")
    (b / "random.jpg").write_bytes(bytes(range(256)) * 20)
    (b / "notes.txt").write_text("not an image")
    (b / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (b / "absurd.jpg").write_bytes(_absurd_size())
    (root / "README.txt").write_text("loose file at the root")
    return root
