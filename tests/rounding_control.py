"""`python -m tests.rounding_control [--plain-to DIR] ARGS`: fgic.ddp ARGS on one process with the samples of every
training batch in reverse order. Only the order of float sums changes (each sample keeps its augmentation and drop
masks, keyed by its index; BatchNorm and the loss add the same values in another order), so its distance from the plain
one-process run is what float rounding alone makes of the run: the yardstick for 1 vs N processes, for any arch. The
CPU's thread count is none: a ViT's matmuls give the same bits on 1 and 2 threads (measured with vit_b_32's gradients).

--plain-to DIR first runs fgic.ddp ARGS as given, into --output-dir DIR, in this process: the plain run and its control
from one process start (an fgic.ddp start is ~3 CPU-s of imports; fgic.ddp's main seeds and builds everything anew).
--torch-masks-to DIR then runs them again with torch's own dropout and stochastic depth masks (FGIC_TEST_TORCH_DROP),
into DIR: how far a change of masks alone moves the run."""
from __future__ import annotations

import itertools
import os
import sys

from fgic import ddp, samplers
from fgic.cli import run_cli


def reverse_batches(batch: int) -> None:
    """Every `batch` consecutive samples of this process's training order come reversed: its share of one step's
    global batch (under torchrun, each rank's share: the steps keep their samples, a resumed run included)."""
    plain = samplers.TrainSampler.__iter__

    def reversed_iter(self):
        order = plain(self)
        while chunk := list(itertools.islice(order, batch)):
            yield from reversed(chunk)
    samplers.TrainSampler.__iter__ = reversed_iter


# the runs made before the control, in the order given, each with its test hooks (fgic.ddp's main reads them from the
# environment)
FIRST = {"--plain-to": {}, "--torch-masks-to": {"FGIC_TEST_TORCH_DROP": "1"}}


def main(argv: list[str]) -> int:
    first = []
    while argv[:1] and argv[0] in FIRST:
        first.append((argv[0], argv[1]))
        argv = argv[2:]
    for flag, folder in first:
        os.environ.update(FIRST[flag])
        code = ddp.main([*argv, "--output-dir", folder])
        for hook in FIRST[flag]:
            del os.environ[hook]
        if code:
            return code
    reverse_batches(int(argv[argv.index("--batch-size") + 1]) // int(os.environ.get("WORLD_SIZE", 1)))
    return ddp.main(argv)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]), "fgic.ddp")
