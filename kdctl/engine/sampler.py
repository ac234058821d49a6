"""A resumable, distributed sampler whose augmentation seeds travel with the indices.

For epoch ``e`` the order is a permutation drawn from ``(seed, e)``; rank ``r`` of ``world`` takes every
``world``-th index (the list padded to a multiple of ``world``, as DistributedSampler does). Each index is yielded
as ``(index, sample_seed)`` so that the dataset can seed its random augmentation per sample: the data of step k is
then the same in an uninterrupted run, in a resumed one, with any number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[tuple[int, int]]):
    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch = 0
        self.start = 0  # number of this rank's samples to skip (resume mid-epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` samples of this rank."""
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return -(-self.n // self.world)

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.start)

    def order(self) -> list[int]:
        """The full order of this epoch (all ranks, padded), before rank selection."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.per_rank() * self.world
        idx += idx[: total - len(idx)] if total > len(idx) else []
        return idx

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self.order()[self.rank :: self.world]
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_033
        for pos in range(self.start, len(mine)):
            # the seed depends on the global position, so every rank/worker layout draws the same augmentation
            yield mine[pos], (base + pos * self.world + self.rank) % (2**63)
