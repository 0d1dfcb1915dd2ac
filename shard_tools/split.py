"""Duplicate groups and the stratified, seeded split (train/val/test, or K folds and test).

Exact duplicates share a SHA-256; near duplicates (re-encoded or slightly resized copies) have
perceptual hashes within `NEAR_BITS` bits. Each group is one unit of the split, so a test image
never has its twin in training. Units are dealt per class, in a seeded order: into test until
the class's test share is full, then into validation (or, with folds, into the fold that holds
the fewest of that class so far), the rest into training. The test split depends only on the
seed and the test fraction, so a fold build holds out exactly the test split of a plain build.

Near duplicates are found with a block index, not by comparing all pairs: the 256 hash bits are
dealt into NEAR_BITS + 1 disjoint blocks, and two hashes within NEAR_BITS bits differ in at
most NEAR_BITS blocks, so they agree exactly on at least one (pigeonhole). Only pairs sharing a
block value are compared: exact for any dealing. Endoscopy frames share a dark round border,
so many hash bits are nearly constant across a data set; the bits are dealt by how much they
vary in the data at hand (round robin in order of entropy), so that every block separates the
images about equally well and the buckets stay small.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

# Hamming distance (of 256 bits) up to which two images count as the same picture. Measured on
# the synthetic set: re-encoding at quality 60 after a 15% downscale moves the hash 0..6 bits,
# while the closest two distinct frames of 240 were 48 bits apart.
NEAR_BITS = 16
HASH_BITS = 256


@dataclass(frozen=True)
class Item:
    """What the split needs of one decodable file."""

    rel: str
    cls: str
    sha256: str
    phash: str  # hex, see imagecheck.phash


class _Groups:
    """Union-find over item indices; the smallest index of a group is its representative."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return sorted((g for g in out.values() if len(g) > 1), key=lambda g: g[0])


def _bit(hashes: np.ndarray, j: int) -> np.ndarray:
    """Bit j (0 = most significant of byte 0) of each (n, 32) uint8 hash: (n,) uint32."""
    return ((hashes[:, j // 8] >> (7 - j % 8)) & 1).astype(np.uint32)


def _blocks(hashes: np.ndarray, count: int) -> list[list[int]]:
    """`count` disjoint sets of bit positions, dealt round robin in order of how much each
    bit varies over `hashes` (entropy), so every block carries about the same information."""
    p = np.array([_bit(hashes, j).mean() for j in range(HASH_BITS)])
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nan_to_num(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    order = np.argsort(-entropy, kind="stable")
    return [sorted(order[b::count].tolist()) for b in range(count)]


def _block_values(hashes: np.ndarray, bits: list[int]) -> np.ndarray:
    """The block's bits of each hash as one integer (n,) uint32 (at most 32 bits)."""
    value = np.zeros(len(hashes), np.uint32)
    for j in bits:
        value = (value << np.uint32(1)) | _bit(hashes, j)
    return value


def _near_pairs_in_block(values: np.ndarray, words: np.ndarray, near_bits: int):
    """(i, j) index arrays of items sharing `values` whose hashes are within near_bits."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    sizes = np.diff(np.r_[starts, len(values)])
    after = np.repeat(sizes, sizes) - (np.arange(len(values)) - np.repeat(starts, sizes)) - 1
    active, d = np.flatnonzero(after >= 1), 1  # positions with a group mate d places later
    while active.size:
        i, j = order[active], order[active + d]
        dist = np.bitwise_count(words[i] ^ words[j]).sum(axis=1)
        near = dist <= near_bits
        yield i[near], j[near]
        d += 1
        active = active[after[active] >= d]


def duplicate_groups(items: list[Item], near_bits: int = NEAR_BITS) -> list[list[int]]:
    """Indices of items that are exact or near copies of each other (groups of 2 or more)."""
    groups = _Groups(len(items))
    first: dict[str, int] = {}
    for i, it in enumerate(items):
        groups.union(i, first.setdefault(it.sha256, i))
    if len(items) < 2:
        return groups.groups()
    hashes = np.stack([np.frombuffer(bytes.fromhex(it.phash), np.uint8) for it in items])
    words = np.ascontiguousarray(hashes).view(">u8")  # (n, 4) 64-bit words for popcount
    for bits in tqdm(_blocks(hashes, near_bits + 1), desc="near duplicates", unit="block",
                     leave=False):
        for ii, jj in _near_pairs_in_block(_block_values(hashes, bits), words, near_bits):
            for i, j in zip(ii.tolist(), jj.tolist()):
                groups.union(i, j)
    return groups.groups()


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(validation, test) sizes for a class of n images: 1000 -> (200, 104) by default."""
    return round(n * val_fraction), round(n * test_fraction)


def _units_by_class(items: list[Item], groups: list[list[int]]) -> dict[str, dict[int, list]]:
    """class -> {unit id: member indices}; a group spanning classes goes with its first member."""
    unit_of = list(range(len(items)))
    for g in groups:
        for i in g:
            unit_of[i] = g[0]
    units: dict[str, dict[int, list[int]]] = {}
    for i in range(len(items)):
        units.setdefault(items[unit_of[i]].cls, {}).setdefault(unit_of[i], []).append(i)
    return units


def _seeded_units(members: dict[int, list[int]], seed: int, cls: str) -> list[int]:
    order = sorted(members)
    random.Random(f"{seed}:{cls}").shuffle(order)
    return order


def assign_splits(
    items: list[Item], groups: list[list[int]], val_fraction: float, test_fraction: float,
    seed: int,
) -> list[str]:
    """The split name of each item ('train', 'val' or 'test'); deterministic in `seed`."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val and test fractions must be in [0, 1) and sum to less than 1")
    split = ["train"] * len(items)
    for cls, members in sorted(_units_by_class(items, groups).items()):
        n = sum(len(m) for m in members.values())
        n_val, n_test = split_counts(n, val_fraction, test_fraction)
        taken = {"test": 0, "val": 0}
        for u in _seeded_units(members, seed, cls):
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


def assign_folds(items: list[Item], groups: list[list[int]], folds: int, test_fraction: float,
                 seed: int) -> list[int]:
    """The fold (0..folds-1) of each item, or -1 for the test split; stratified per class, a
    duplicate group never split, and the test split the same as `assign_splits` draws."""
    if folds < 2:
        raise ValueError("--folds must be at least 2")
    fold = [-1] * len(items)
    total = [0] * folds  # samples per fold over all classes: breaks ties towards balance
    for cls, members in sorted(_units_by_class(items, groups).items()):
        n = sum(len(m) for m in members.values())
        n_test = split_counts(n, 0.0, test_fraction)[1]
        taken_test, mine = 0, [0] * folds
        for u in _seeded_units(members, seed, cls):
            size = len(members[u])
            if taken_test + size <= n_test:
                taken_test += size
                continue
            f = min(range(folds), key=lambda k: (mine[k], total[k], k))
            mine[f] += size
            total[f] += size
            for i in members[u]:
                fold[i] = f
    return fold
