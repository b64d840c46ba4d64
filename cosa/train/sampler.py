"""An infinite, rank-sharded, resumable sampler: the data order is a pure function of the seed.

Epoch e visits a permutation drawn from `seed + e`; rank r of W takes every W-th index of it (the
tail that does not fill a whole global batch is dropped, like DistributedSampler with drop_last).
Starting at iteration n resumes exactly where a run that stopped after n iterations would have
continued.
Items are `(epoch, index)` pairs so the dataset can derive per-sample augmentation seeds from them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[tuple[int, int]]):
    def __init__(
        self,
        num_samples: int,
        batch_per_rank: int,
        rank: int,
        world_size: int,
        seed: int,
        start_iteration: int = 0,
    ) -> None:
        if num_samples < batch_per_rank * world_size:
            raise ValueError(
                f"dataset of {num_samples} images is smaller than one global batch "
                f"({batch_per_rank * world_size})"
            )
        self.num_samples = num_samples
        self.batch_per_rank = batch_per_rank
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_iteration = start_iteration
        self.iters_per_epoch = num_samples // (batch_per_rank * world_size)

    def _epoch_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        usable = self.iters_per_epoch * self.batch_per_rank * self.world_size
        return order[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, it_in_epoch = divmod(self.start_iteration, self.iters_per_epoch)
        offset = it_in_epoch * self.batch_per_rank
        while True:
            for index in self._epoch_indices(epoch)[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0
