"""Checkpoints: atomic saving, safe loading, which checkpoint to resume from, and whether it fits this run's config."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fgic.errors import FgicError
from fgic.weights import safe_load

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
# Options that change what a run computes: resuming across a change of any of them is refused. The world size and
# the worker count are not among them: fgic gives the same result on any layout, so a run may resume on another.
MEANING = ("dataset", "num_classes", "arch", "weights", "batch_size", "epochs", "lr", "momentum", "weight_decay",
           "label_smoothing", "resize", "crop", "padding", "seed", "amp")


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a kill at any moment leaves either
    the previous file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(fd)
    finally:
        os.close(fd)


def select(resume: str, run_dir: Path) -> Path | None:
    """--resume auto: the run folder's checkpoint if there is one; none: start over; else the named file."""
    if resume == "none":
        return None
    if resume == "auto":
        path = run_dir / CHECKPOINT
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FgicError(f"--resume {resume}: no such file; give a checkpoint.pt, or auto or none")
    return path


def load(path: Path) -> dict:
    ckpt = safe_load(path, "--resume")
    if not isinstance(ckpt, dict) or not {"model", "epoch", "config"} <= ckpt.keys():
        raise FgicError(f"--resume {path}: not an fgic checkpoint (needs model, epoch and config entries)")
    return ckpt


def differences(saved: dict, current: dict) -> list[str]:
    """The meaning-changing options whose values differ, as 'option: saved -> current'."""
    return [f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {current.get(k)!r}"
            for k in MEANING if saved.get(k) != current.get(k)]
