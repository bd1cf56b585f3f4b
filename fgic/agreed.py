"""What every process of a job must have alike before it trains, checked across the processes at set-up: the mixed
precision mode (-a auto resolves per device) and the images (-d may be a copy on each node). Each check fails on
every process together, in one line that names the processes that differ."""
from __future__ import annotations

import socket
from pathlib import Path

import torch

from fgic.dist import Dist
from fgic.errors import FgicError


def same_amp(dist: Dist, amp: str) -> None:
    """One mode on every process. On a job whose GPUs differ (one with bfloat16 beside a V100 or T4), -a auto would
    train some ranks in bf16 and others in fp16 with a GradScaler, averaging scaled gradients with unscaled ones,
    and give each rank another run folder."""
    if not dist.distributed:
        return
    name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else dist.device.type
    views = differing(dist, amp, f" ({name}): {amp}")
    if views:
        raise FgicError(f"-a/--amp resolves to other modes on this job's devices ({views}); give one mode that every "
                        f"device has, e.g. -a fp16, or run on alike GPUs", shown=dist.is_main)


def same_images(dist: Dist, root: Path, files: str, train_images: int, test_images: int) -> None:
    """The same images (`files`: data.fingerprint) on every process. Node-local copies of -d that differ (one still
    syncing, a node with an older copy) would shard other lists: other images on each rank, or other step counts,
    which hang at an epoch's end until the collective's timeout."""
    if not dist.distributed:
        return
    views = differing(dist, files, f": {train_images} train / {test_images} test images")
    if views:
        raise FgicError(f"-d {root}: the processes see other images ({views}, not the same files); give every node "
                        f"the same, complete copy of the dataset", shown=dist.is_main)


def differing(dist: Dist, value, said: str) -> str:
    """'' when every process has rank 0's `value`; else rank 0 and up to three that differ, each as 'rank R on HOST'
    and its `said`."""
    seen = dist.gather((value, said, socket.gethostname()), patient=True)
    if all(v == seen[0][0] for v, _, _ in seen):
        return ""
    views = [f"rank {r} on {host}{text}" for r, (v, text, host) in enumerate(seen) if r == 0 or v != seen[0][0]]
    return "; ".join(views[:4])
