"""Console-script entry points: say which extra to install when a command's libraries are
missing, instead of an ImportError traceback (the base install is `kvasir-shard` only)."""

from __future__ import annotations

import importlib.util
import sys

INSTALL = "pip install 'kvasir-dali[train,cu13]' (CUDA 12: [train,cu12])"


def _require(prog: str, modules: tuple[str, ...]) -> None:
    def present(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a missing parent package (nvidia for nvidia.dali)
            return False

    missing = [m for m in modules if not present(m)]
    if missing:
        print(f"{prog}: error: {', '.join(missing)} not installed; {prog} needs the training "
              f"stack: {INSTALL}", file=sys.stderr)
        sys.exit(2)


def train() -> int:
    _require("kvasir-train", ("torch", "lightning", "timm", "torchmetrics", "nvidia.dali"))
    from .cli import main

    return main()


def predict() -> int:
    _require("kvasir-predict", ("torch", "timm", "nvidia.dali"))
    from .predict import main

    return main()


def export() -> int:
    _require("kvasir-export", ("torch", "timm", "onnx", "nvidia.dali"))
    from .export import main

    return main()


def report() -> int:
    _require("kvasir-report", ("yaml", "matplotlib"))
    from .leaderboard import main

    return main()
