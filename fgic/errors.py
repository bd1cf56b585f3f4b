"""One-line user errors: the exception fgic raises for bad input and the wrapper that turns it into exit code 2."""
from __future__ import annotations

import os
import sys
from typing import Callable

EXIT_USAGE = 2


class FgicError(Exception):
    """Bad input or an unusable environment. The message is one line that names the file or flag and what to do.
    `shown`: whether this process prints it; None: its node's first process does (see run_cli)."""

    def __init__(self, *args, shown: bool | None = None):
        super().__init__(*args)
        self.shown = shown


def local_rank(env=os.environ) -> int:
    """This process's place on its node under torchrun or a multi-task srun step (as fgic.cluster.detect reads it),
    else 0."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env.get("LOCAL_RANK", 0))
    if env.get("SLURM_STEP_ID", env.get("SLURM_STEPID")) is not None and int(env.get("SLURM_NTASKS", 1)) > 1:
        return int(env.get("SLURM_LOCALID", 0))
    return 0


def run_cli(main: Callable[[], int | None], prog: str = "fgic") -> None:
    """Run ``main`` and exit with its code; an FgicError prints one line (no traceback) and exits 2. An error every
    process of a node finds alike (the flags, the data: fgic.ddp checks them before the process group exists) is
    printed by the node's first process only (8 identical lines on an 8-GPU node before); Dist.agree marks the errors
    of the steps after that."""
    try:
        code = main()
    except FgicError as exc:
        if exc.shown if exc.shown is not None else local_rank() == 0:
            print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)
