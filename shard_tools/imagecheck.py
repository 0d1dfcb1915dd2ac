"""Decide, for one file's bytes, whether it is packed as is, converted, or rejected.

Every file is fully decoded (a header alone does not prove a JPEG is whole). A baseline RGB
JPEG without an EXIF rotation is packed byte for byte; anything else that decodes becomes a
baseline RGB JPEG because DALI's hardware decoder takes baseline only. Pure function of the
bytes and the options, so it runs in worker processes.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

# Anything above this many pixels is called absurd (the largest Kvasir frame is 2.1 MP).
MAX_PIXELS = 80_000_000
# Re-encode quality for converted images: high enough that conversion costs no accuracy.
JPEG_QUALITY = 95
_EXIF_ORIENTATION = 0x0112


@dataclass
class Verdict:
    """What `inspect` found. `reasons` is empty for a file packed byte for byte."""

    sha256: str
    ok: bool
    error: str = ""
    width: int = 0  # pixels, as stored (before any EXIF rotation)
    height: int = 0
    fmt: str = ""
    mode: str = ""
    reasons: list[str] = field(default_factory=list)
    phash: str = ""  # perceptual hash of the displayed image (see `phash`)

    @property
    def convert(self) -> bool:
        return bool(self.reasons)


def sof_marker(data: bytes) -> int | None:
    """The first start-of-frame marker (0xC0 baseline, 0xC2 progressive...) or None."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + seg_len
    return None


def phash(img: Image.Image) -> str:
    """DCT perceptual hash, 256 bits as 64 hex digits: survives re-encoding and mild resizing.

    256 rather than the usual 64 bits because endoscopy frames share a dark round border that
    dominates the lowest frequencies: at 64 bits distinct synthetic frames came within 4 bits.
    """
    size, keep = 64, 16
    small = np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR),
                       np.float64)
    n = np.arange(size)
    basis = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size))  # (freq, pos)
    low = (basis @ small @ basis.T)[:keep, :keep].flatten()[1:]  # drop DC: brightness alone
    bits = np.concatenate([[0], low > np.median(low)]).astype(np.uint8)
    return np.packbits(bits).tobytes().hex()


def inspect(data: bytes, max_side: int = 0) -> Verdict:
    """Fully decode `data` and say whether and why it needs converting."""
    return inspect_image(data, max_side)[0]


def inspect_image(data: bytes, max_side: int = 0) -> tuple[Verdict, Image.Image | None]:
    """`inspect`, and the decoded image as displayed (EXIF orientation applied; None when it
    does not decode), for callers that need the pixels too: one decode per file."""
    v = Verdict(sha256=hashlib.sha256(data).hexdigest(), ok=False)
    if not data:
        v.error = "empty file"
        return v, None
    try:
        with warnings.catch_warnings():
            # Our own size check below runs before any pixel is decoded; PIL's would reject
            # before we could read the declared size to report it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None
            img = Image.open(io.BytesIO(data))
            v.width, v.height, v.fmt, v.mode = img.width, img.height, img.format or "", img.mode
            if v.width <= 0 or v.height <= 0 or v.width * v.height > MAX_PIXELS:
                v.error = f"absurd declared size {v.width}x{v.height} (limit {MAX_PIXELS} px)"
                return v, None
            img.load()  # the full decode: raises on truncated or corrupt data
            shown = ImageOps.exif_transpose(img)
    except Image.UnidentifiedImageError:
        # PIL's message names a BytesIO's memory address: no use, and not reproducible.
        v.error = "does not decode as an image: not a recognised image format"
        return v, None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a rejection reason
        v.error = f"does not decode as an image: {type(exc).__name__}: {exc}"
        return v, None
    if v.fmt != "JPEG":
        v.reasons.append(f"{v.fmt or 'unknown'} content, not JPEG")
    else:
        marker = sof_marker(data)
        if marker == 0xC2:
            v.reasons.append("progressive JPEG")
        elif marker != 0xC0:
            v.reasons.append(f"non-baseline JPEG (SOF 0x{marker or 0:02X})")
    if v.mode != "RGB":
        v.reasons.append(f"{v.mode} colour mode")
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        v.reasons.append("EXIF orientation applied")
    if max_side and max(shown.size) > max_side:
        v.reasons.append(f"downscaled to max side {max_side}")
    v.phash = phash(shown)
    v.ok = True
    return v, shown


def convert(data: bytes, max_side: int = 0) -> tuple[bytes, int, int]:
    """Baseline RGB JPEG of `data` with orientation applied; returns (bytes, width, height)."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency on black, like the endoscope's border, not on arbitrary RGB.
        base = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(base, img.convert("RGBA"))
    img = img.convert("RGB")
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=JPEG_QUALITY, progressive=False, optimize=False)
    return out.getvalue(), img.width, img.height
