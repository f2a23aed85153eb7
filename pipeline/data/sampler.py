"""Repeat-factor sampling (LVIS, Gupta et al. 2019) that also splits the epoch across processes.

For each category c, f(c) is the fraction of training images that contain c; its repeat factor is
r(c) = max(1, sqrt(t / f(c))); an image repeats r(I) = max over its categories of r(c) times per epoch
(1 for an image without annotations). Fractional factors are rounded stochastically, anew each epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def category_repeat_factors(image_categories: Sequence[Sequence[int]], threshold: float) -> dict[int, float]:
    """r(c) = max(1, sqrt(t / f(c))) for every category present in ``image_categories`` (one list of
    category indices per image; duplicates inside an image count once)."""
    num_images = len(image_categories)
    counts: dict[int, int] = {}
    for cats in image_categories:
        for c in set(int(c) for c in cats):
            counts[c] = counts.get(c, 0) + 1
    return {c: max(1.0, math.sqrt(threshold / (n / num_images))) for c, n in counts.items()}


def repeat_factors(image_categories: Sequence[Sequence[int]], threshold: float) -> np.ndarray:
    """(N,) float64 image repeat factors r(I) = max_{c in I} r(c); 1 for images without categories and
    for ``threshold`` 0 (sampling disabled)."""
    if threshold <= 0:
        return np.ones(len(image_categories), dtype=np.float64)
    per_cat = category_repeat_factors(image_categories, threshold)
    return np.asarray([max((per_cat[int(c)] for c in cats), default=1.0) for cats in image_categories],
                      dtype=np.float64)


def dist_info(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(num_replicas, rank), defaulting to torch.distributed's (1, 0 when not initialised)."""
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} out of range [0, {num_replicas})")
    return num_replicas, rank


class RepeatFactorSampler(Sampler[int]):
    """Each epoch: repeat image i floor(r_i) times plus once more with probability frac(r_i), shuffle,
    pad to a multiple of the number of processes and give process ``rank`` every ``num_replicas``-th
    index (like DistributedSampler). The same ``seed`` + epoch gives the same epoch in every process.
    With all factors 1 this is a plain (distributed) shuffling sampler. Call :meth:`set_epoch`."""

    def __init__(self, factors: Sequence[float], num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0) -> None:
        self.factors = torch.as_tensor(np.asarray(factors, dtype=np.float64))
        if len(self.factors) == 0:
            raise ValueError("repeat-factor sampler: empty dataset")
        if (self.factors < 1).any():
            raise ValueError("repeat factors must be >= 1")
        self.num_replicas, self.rank = dist_info(num_replicas, rank)
        self.shuffle = shuffle
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._indices = self._epoch_indices()

    def _epoch_indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        whole = self.factors.floor()
        reps = whole + (torch.rand(len(self.factors), generator=g, dtype=torch.float64) < self.factors - whole)
        indices = torch.repeat_interleave(torch.arange(len(self.factors)), reps.long())
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=g)]
        total = math.ceil(len(indices) / self.num_replicas) * self.num_replicas
        if total > len(indices):  # wrap around so every process gets the same count
            indices = indices.repeat(math.ceil(total / len(indices)))[:total]
        return indices[self.rank::self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)
