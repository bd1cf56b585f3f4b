"""`python -m tests.rounding_control ARGS`: fgic.ddp ARGS on one process with the samples of every training batch in
reverse order. Only the order of float sums changes (each sample keeps its augmentation and drop masks, keyed by its
index; BatchNorm and the loss add the same values in another order), so its distance from the plain one-process run
is what float rounding alone makes of the run: the yardstick for 1 vs N processes, for any arch. The CPU's thread
count is none: a ViT's matmuls give the same bits on 1 and 2 threads (measured with vit_b_32's gradients)."""
from __future__ import annotations

import itertools
import sys

from fgic import ddp, samplers


def reverse_batches(batch: int) -> None:
    """Every `batch` consecutive samples of the training order come reversed (one process: one batch)."""
    plain = samplers.TrainSampler.__iter__

    def reversed_iter(self):
        order = plain(self)
        while chunk := list(itertools.islice(order, batch)):
            yield from reversed(chunk)
    samplers.TrainSampler.__iter__ = reversed_iter


if __name__ == "__main__":
    argv = sys.argv[1:]
    reverse_batches(int(argv[argv.index("--batch-size") + 1]))
    ddp.cli()
