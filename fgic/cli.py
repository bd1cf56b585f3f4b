"""The entry points' wrapper: an FgicError is one line and exit code 2, Ctrl-C outside training exit code 130."""
from __future__ import annotations

import sys
from typing import Callable

from fgic.cluster import local_rank
from fgic.errors import EXIT_USAGE, FgicError


def run_cli(main: Callable[[], int | None], prog: str = "fgic") -> None:
    """Run ``main`` and exit with its code; an FgicError prints one line (no traceback) and exits 2. An error every
    process of a node finds alike (the flags, the data: fgic.ddp checks them before the process group exists) is
    printed by the node's first process only (8 identical lines on an 8-GPU node before); Dist.agree marks the errors
    of the steps after that."""
    try:
        code = main()
    except FgicError as exc:
        if exc.shown if exc.shown is not None else local_rank() == 0:
            _line(f"{prog}: error: {exc}")
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        _line(f"{prog}: interrupted")
        sys.exit(130)
    sys.exit(code or 0)


def _line(text: str) -> None:
    """Print a line every process may print at once in one write: print's two (the text, then the newline) ran two
    ranks' lines together under PYTHONUNBUFFERED=1, which Slurm scripts and containers often set."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
