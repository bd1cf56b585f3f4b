"""Samplers: a training order that keeps each global batch whatever the process count, and exact evaluation shards."""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

# How an epoch's permutation is seeded. "seed+epoch" is DistributedSampler's generator seed, seed + epoch: seeds one
# apart trained on the same orders one epoch apart (seed 2021's epoch e was seed 2020's epoch e+1), so the runs of a
# seed sweep were not independent. "keyed" seeds it from a hash of (seed, epoch). A run keeps the order it started
# with (order_of); new runs take ORDER.
ORDERS = ("seed+epoch", "keyed")
ORDER = "keyed"


def order_of(saved_config: dict) -> str:
    """The order of a checkpoint's run; runs from before the choice wrote none and trained seed+epoch."""
    return saved_config.get("sample_order", "seed+epoch")


class TrainSampler(DistributedSampler):
    """torch's DistributedSampler, yielding (epoch, index) keys so each sample's augmentation follows its key.

    Why the global batch does not depend on the world size W: the permutation comes from (seed, epoch) only, rank r
    takes positions r, r+W, r+2W, ..., and its k-th batch of B/W samples therefore holds positions
    [k*B, (k+1)*B) of the permutation interleaved across ranks - the same B samples a single process uses.
    drop_last=True here and in the DataLoader keeps floor(N / B) full global batches for any W.
    """

    def __init__(self, dataset_len: int, world_size: int, rank: int, seed: int, order: str = ORDER):
        super().__init__(range(dataset_len), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        if order not in ORDERS:
            raise ValueError(f"sample order {order!r}: one of {ORDERS}")
        self.order = order
        self.skip = 0

    def generator_seed(self) -> int:
        if self.order == "seed+epoch":
            return self.seed + self.epoch
        words = np.random.SeedSequence((self.seed % 2 ** 64, self.epoch)).generate_state(2, np.uint32)
        return int(words[0]) << 31 | int(words[1]) >> 1  # 63 bits: torch's manual_seed takes any of them

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation; `skip` drops this rank's first samples (resuming inside an epoch)."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator()
        g.manual_seed(self.generator_seed())
        order = torch.randperm(len(self.dataset), generator=g).tolist()[self.rank:self.total_size:self.num_replicas]
        epoch = self.epoch
        return ((epoch, i) for i in itertools.islice(order, self.skip, None))

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
