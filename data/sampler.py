"""Deterministic, resumable, world-size independent batch order.

The order of an epoch is a permutation seeded by ``(seed, epoch)``; global batch ``s`` is the
slice ``perm[s*B:(s+1)*B]`` and rank ``r`` of ``W`` takes the ``r``-th contiguous part of it (a
last partial batch, kept unless ``drop_last``, is split as evenly as it goes: ranks differ by at
most one image). So the set of samples in each global step is the same for any world size with the
same global batch, and a run resumed at step ``s`` of an epoch sees exactly the batches it would
have seen.
Each index is paired with a per-sample seed so that random augmentation does not depend on the
worker that loads it or on where the run was resumed (see ``SeededDataset``).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

_MIX = 0x9E3779B1  # odd constant to spread (seed, epoch) into distinct generator seeds


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * _MIX + epoch * 1_000_003) % (2**62)


def rank_part(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` items split over ``world_size`` as evenly as possible."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's part of each global batch as ``[(index, sample_seed), ...]``."""

    def __init__(self, n: int, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start_step = 1, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full if (self.drop_last or rest == 0) else full + 1

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def batch_size_of(self, step: int) -> int:
        """Images in global batch ``step`` (0-based) of an epoch, summed over the ranks."""
        return min(self.global_batch, self.n - step * self.global_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        sample_seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        for s in range(self.start_step, self.steps_per_epoch):
            idx = perm[s * self.global_batch:(s + 1) * self.global_batch]
            mine = rank_part(len(idx), self.rank, self.world_size)
            yield list(zip(idx[mine].tolist(), sample_seeds[s * self.global_batch:][mine].tolist()))


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(i, seed)`` draws its random augmentation from ``seed``.

    The global torch RNG of the calling process is left untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        i, seed = key
        # Only the CPU generator drives the transforms; torch.manual_seed would also reseed every
        # accelerator generator (about 100x slower per item).
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(seed)
        try:
            return self.dataset[i]
        finally:
            gen.set_state(state)
