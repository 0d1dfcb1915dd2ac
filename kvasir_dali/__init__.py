"""kvasir_dali: DALI pipelines over kvasir-shard shards, a DataModule and FastViT training.

Import order matters for DDP by fork (notebooks): nothing here touches CUDA at import time.
"""

__version__ = "0.1.0"
