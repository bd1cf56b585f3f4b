"""fgic's JSON files: written whole (a reader never sees half a file), read back checked (a damaged file is a one-line
error naming it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from fgic.errors import FgicError


def write_json(path: Path, obj) -> None:
    """Write JSON through a temporary file and os.replace, so readers never see half a file."""
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary file and os.replace, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise FgicError(f"{path}: unreadable ({why}); fix or remove the file") from None


def read_object(path: Path) -> dict:
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise FgicError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); fix or remove the file") from None
    if not isinstance(obj, dict):
        raise FgicError(f"{path}: expected a JSON object, found {type(obj).__name__}; fix or remove the file")
    return obj
