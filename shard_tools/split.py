"""Duplicate groups and the stratified, seeded train/val/test split.

Exact duplicates share a SHA-256; near duplicates (re-encoded or slightly resized copies) have
perceptual hashes within `NEAR_BITS` bits. Each group is one unit of the split, so a test image
never has its twin in training. Units are dealt per class, in a seeded order, into test, then
validation, then training, until each split holds its share of that class.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

# Hamming distance (of 256 bits) up to which two images count as the same picture. Measured on
# the synthetic set: re-encoding at quality 60 after a 15% downscale moves the hash 0..6 bits,
# while the closest two distinct frames of 240 were 48 bits apart.
NEAR_BITS = 16


@dataclass(frozen=True)
class Item:
    """What the split needs of one decodable file."""

    rel: str
    cls: str
    sha256: str
    phash: str  # hex, see imagecheck.phash


def duplicate_groups(items: list[Item], near_bits: int = NEAR_BITS) -> list[list[int]]:
    """Indices of items that are exact or near copies of each other (groups of 2 or more)."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first: dict[str, int] = {}
    for i, it in enumerate(items):
        union(i, first.setdefault(it.sha256, i))
    hashes = np.stack([np.frombuffer(bytes.fromhex(it.phash), np.uint8) for it in items])
    for i in range(len(items) - 1):
        dist = np.bitwise_count(hashes[i + 1 :] ^ hashes[i]).sum(axis=1)
        for j in np.nonzero(dist <= near_bits)[0]:
            union(i, i + 1 + int(j))
    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(validation, test) sizes for a class of n images: 1000 -> (200, 104) by default."""
    return round(n * val_fraction), round(n * test_fraction)


def assign_splits(
    items: list[Item], groups: list[list[int]], val_fraction: float, test_fraction: float,
    seed: int,
) -> list[str]:
    """The split name of each item ('train', 'val' or 'test'); deterministic in `seed`."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val and test fractions must be in [0, 1) and sum to less than 1")
    unit_of = list(range(len(items)))
    for g in groups:
        for i in g:
            unit_of[i] = g[0]
    units: dict[str, dict[int, list[int]]] = {}
    for i, it in enumerate(items):
        # A group that spans classes is dealt with the class of its first member.
        cls = items[unit_of[i]].cls
        units.setdefault(cls, {}).setdefault(unit_of[i], []).append(i)
    split = ["train"] * len(items)
    for cls in sorted(units):
        members = units[cls]
        n = sum(len(m) for m in members.values())
        n_val, n_test = split_counts(n, val_fraction, test_fraction)
        order = sorted(members)
        random.Random(f"{seed}:{cls}").shuffle(order)
        taken = {"test": 0, "val": 0}
        for u in order:
            size = len(members[u])
            name = "train"
            if taken["test"] + size <= n_test:
                name = "test"
            elif taken["val"] + size <= n_val:
                name = "val"
            if name != "train":
                taken[name] += size
            for i in members[u]:
                split[i] = name
    return split
