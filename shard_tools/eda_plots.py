"""The EDA's pictures (matplotlib, headless). Small files: thumbnails and 90 dpi charts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

DARK = 16  # histogram bins below this are the endoscope's black border: left out of the plot


def grid_png(path: Path, thumbs: dict[str, list[Image.Image]], cell: int = 110) -> None:
    """One row per class: its name, then its thumbnails letterboxed into square cells."""
    cols = max((len(v) for v in thumbs.values()), default=1)
    label_w = 190
    grid = Image.new("RGB", (label_w + cols * cell, len(thumbs) * cell), "white")
    for r, (cls, imgs) in enumerate(thumbs.items()):
        for c, img in enumerate(imgs):
            t = img.copy()
            t.thumbnail((cell - 4, cell - 4))
            grid.paste(t, (label_w + c * cell + (cell - t.width) // 2,
                           r * cell + (cell - t.height) // 2))
    fig = plt.figure(figsize=(grid.width / 100, grid.height / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(grid)
    for r, cls in enumerate(thumbs):
        ax.text(8, r * cell + cell / 2, cls, va="center", fontsize=9)
    ax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    # A 256-colour palette keeps a photo grid small enough to commit and show in a README.
    Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path,
                                                                              optimize=True)


def resolutions_png(path: Path, e: dict, top: int = 12) -> None:
    """Images per resolution (the `top` most common), stacked by class."""
    sizes = [r["size"] for r in e["resolutions"][:top]]
    classes = list(e["per_class"])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(sizes) + 1.6))
    left = np.zeros(len(sizes))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(classes):
        n = np.array([e["per_class"][c]["resolutions"].get(s, 0) for s in sizes], float)
        ax.barh(range(len(sizes)), n, left=left, color=cmap(i % 10), label=c)
        left += n
    for i, v in enumerate(left):
        ax.text(v, i, f" {int(v)}", va="center", fontsize=8)
    ax.set_yticks(range(len(sizes)), sizes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title(f"Resolutions (width x height), {e['images']} images", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def colours_png(path: Path, hists: dict[str, np.ndarray]) -> None:
    """Per class: the R, G, B pixel-value distributions (the dark border left out)."""
    n = len(hists)
    cols = 4
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), sharex=True,
                             squeeze=False)
    x = np.arange(DARK, 256)
    for ax, (cls, h) in zip(axes.flat, hists.items()):
        h = np.asarray(h, float)
        dark = h[:, :DARK].sum() / max(h.sum(), 1)
        for ch, colour in enumerate(("tab:red", "tab:green", "tab:blue")):
            d = h[ch, DARK:] / max(h[ch, DARK:].sum(), 1)
            ax.plot(x, d, color=colour, lw=1)
        ax.set_title(f"{cls}\n({100 * dark:.0f}% dark border px)", fontsize=8)
        ax.set_yticks([])
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("pixel value", fontsize=8)
    fig.suptitle("Colour distributions per class (R, G, B)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
