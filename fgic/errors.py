"""One-line user errors: the exception fgic raises for bad input (fgic.cli.run_cli turns it into exit code 2)."""
from __future__ import annotations

EXIT_USAGE = 2


class FgicError(Exception):
    """Bad input or an unusable environment. The message is one line that names the file or flag and what to do.
    `shown`: whether this process prints it; None: its node's first process does (see run_cli)."""

    def __init__(self, *args, shown: bool | None = None):
        super().__init__(*args)
        self.shown = shown
