"""Deterministic, resumable sampling: the order *and the augmentation* of every sample depend only on
``(seed, epoch, position)``, never on worker count, worker scheduling or where a run restarted.

:class:`ResumableSampler` yields ``(index, sample_seed)`` pairs for one process's share of an
epoch (optionally with repeated augmentation), from any start position. :class:`SeededDataset`
runs each item's transforms under its own seed, with the caller's random state restored after.
Together they let a run resume mid-epoch and still produce, bit for bit, the batches an
uninterrupted run would have.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableSampler", "SeededDataset"]

_MIX = 0x9E3779B97F4A7C15


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one sample draw (splitmix-style mixing of the three integers)."""
    x = (seed * _MIX + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(Sampler[Tuple[int, int]]):
    """This process's share of a shuffled epoch, as ``(index, seed)`` pairs, from ``start`` on.

    The epoch's order is a permutation drawn from ``(seed, epoch)``; with ``repeats > 1`` each
    index appears that many times in a row (repeated augmentation: the copies land on different
    processes), and the epoch is cut to the dataset's length, as DeiT's sampler does. Processes
    take every ``world_size``-th entry from ``rank``, padded by wrapping so all have equal
    shares.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 repeats: int = 1):
        self.length, self.rank, self.world_size = length, rank, world_size
        self.seed, self.shuffle, self.repeats = seed, shuffle, repeats
        self.epoch, self.start = 0, 0
        self.per_rank = -(-length // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` entries of this process's share (to resume mid-epoch)."""
        self.start = start

    def epoch_order(self) -> Sequence[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=g) if self.shuffle else torch.arange(self.length)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
        total = self.per_rank * self.world_size
        order = order.tolist()
        if len(order) < total:
            order += order[: total - len(order)]
        return order[:total]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = self.epoch_order()
        for position in range(self.rank + self.start * self.world_size, len(order), self.world_size):
            yield order[position], _sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


class SeededDataset(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` transforms the item under ``seed``.

    Python's, NumPy's and torch's global generators are seeded for the item and restored
    afterwards, so the caller's random streams (dropout, MixToken, mixup) are untouched.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        if isinstance(item, int):
            return self.dataset[item]
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
