"""Image checks before training: every unreadable or truncated image of a split, found at once.

`fast` (the default) reads each file's header and, for JPEG and PNG, its end marker, which catches files cut short
by an interrupted copy, in about a tenth of a millisecond per file. `full` decodes every image. `off` skips both.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

MODES = ("fast", "full", "off")
_TAIL = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xae\x42\x60\x82",)}


def problem(path: str, mode: str) -> str | None:
    """Why `path` cannot be trained on, or None when it looks fine."""
    try:
        with Image.open(path) as img:
            fmt = img.format
            if mode == "full":
                img.load()
                return None
    except Exception as exc:  # PIL raises many types for broken files
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
    tails = _TAIL.get(fmt)
    if tails:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64))
            end = f.read().rstrip(b"\x00\r\n ")
        if not end.endswith(tails):
            return f"truncated {fmt} (no end marker)"
    return None


def scan(paths: list[str], mode: str, workers: int = 8) -> dict[str, str]:
    """{path: problem} for the bad files among `paths`."""
    if mode == "off" or not paths:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = pool.map(lambda p: problem(p, mode), paths, chunksize=64)
        return {p: why for p, why in zip(paths, found) if why}
