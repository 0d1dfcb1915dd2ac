"""kvasir_dali: DALI pipelines over kvasir-shard shards, a DataModule and FastViT training.

The public API, imported on first use so that `import kvasir_dali` stays light and touches no
CUDA (DDP by fork, notebooks):

    from kvasir_dali import KvasirDataModule, KvasirClassifier, ShardSet, PipeSpec, Augment
    from kvasir_dali import load_checkpoint, Predictor
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "KvasirDataModule": "data", "KvasirClassifier": "module", "ShardSet": "shards",
    "PipeSpec": "pipeline", "Augment": "pipeline", "build_pipeline": "pipeline",
    "DaliLoader": "loader", "create_model": "model", "preprocessing": "model",
    "load_checkpoint": "inference", "Preprocess": "inference", "Predictor": "predictor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvasir_dali' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
