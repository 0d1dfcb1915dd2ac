"""shard_tools: pack a folder-per-class JPEG set into WebDataset shards that DALI reads.

Nothing here imports torch or DALI: synthesizing, packing and verifying run on any machine with
Pillow and numpy.
"""

__version__ = "0.1.0"
