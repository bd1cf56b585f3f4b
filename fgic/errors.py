"""One-line user errors: the exception fgic raises for bad input and the wrapper that turns it into exit code 2."""
from __future__ import annotations

import sys
from typing import Callable

EXIT_USAGE = 2


class FgicError(Exception):
    """Bad input or an unusable environment. The message is one line that names the file or flag and what to do."""


def run_cli(main: Callable[[], int | None], prog: str = "fgic") -> None:
    """Run ``main`` and exit with its code; an FgicError prints one line (no traceback) and exits 2."""
    try:
        code = main()
    except FgicError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)
