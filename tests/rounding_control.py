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


def main(argv: list[str]) -> int:
    first = {}  # the runs before the control, in their order: --plain-to, --torch-masks-to
    while argv[:1] in (["--plain-to"], ["--torch-masks-to"]):
        first[argv[0]], argv = argv[1], argv[2:]
    for flag, folder in first.items():
        torch_masks = flag == "--torch-masks-to"
        if torch_masks:
            os.environ["FGIC_TEST_TORCH_DROP"] = "1"  # fgic.ddp's main reads its test hooks from the environment
        code = ddp.main([*argv, "--output-dir", folder])
        if torch_masks:
            del os.environ["FGIC_TEST_TORCH_DROP"]
        if code:
            return code
    reverse_batches(int(argv[argv.index("--batch-size") + 1]) // int(os.environ.get("WORLD_SIZE", 1)))
    return ddp.main(argv)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]), "fgic.ddp")
