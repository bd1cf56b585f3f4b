"""Samplers: a training order that keeps each global batch whatever the process count, and exact evaluation shards."""
from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch.utils.data import DistributedSampler, Sampler


class TrainSampler(DistributedSampler):
    """torch's DistributedSampler, yielding (epoch, index) keys so each sample's augmentation follows its key.

    Why the global batch does not depend on the world size W: the permutation comes from seed + epoch only, rank r
    takes positions r, r+W, r+2W, ..., and its k-th batch of B/W samples therefore holds positions
    [k*B, (k+1)*B) of the permutation interleaved across ranks - the same B samples a single process uses.
    drop_last=True here and in the DataLoader keeps floor(N / B) full global batches for any W.
    """

    def __init__(self, dataset_len: int, world_size: int, rank: int, seed: int):
        super().__init__(range(dataset_len), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation; `skip` drops this rank's first samples (resuming inside an epoch)."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, i) for i in itertools.islice(super().__iter__(), self.skip, None))

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Rank r evaluates samples r, r+W, r+2W, ...: each sample exactly once, no padding (a rank may get none)."""

    def __init__(self, dataset_len: int, world_size: int, rank: int):
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
