"""The process group: pick this process's device, start and stop torch.distributed, and the few collectives fgic
needs (where the process sits among its peers is fgic.cluster's detection)."""
from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist

from fgic.cluster import Launch, check_port
from fgic.errors import FgicError

# How long a collective may wait for a peer before the process group gives up (torch's defaults: 10-30 min). A dead
# peer is normally noticed sooner: torchrun stops the other workers at once, srun --kill-on-bad-exit=1 likewise,
# and gloo sees the closed connection; this bounds the rest (a hung peer, NCCL). FGIC_COLLECTIVE_TIMEOUT_S changes it.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("FGIC_COLLECTIVE_TIMEOUT_S", 120)))
# Set-up steps wait for work that differs from node to node (a node building its decoded-image cache while another
# found its own built, a scan on a slow file system, rank 0 writing a checkpoint): their collectives run in a process
# group of their own (same backend) that waits this long, as long as a cache builder is waited for.
# FGIC_SETUP_TIMEOUT_S changes it.
SETUP_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("FGIC_SETUP_TIMEOUT_S", 3600)))


def pick_device(device_flag: str, gpus: list[int], local_rank: int) -> torch.device:
    """The device this process trains on; names the flag when CUDA or a GPU id isn't there."""
    cuda = torch.cuda.is_available()
    if device_flag == "cpu":
        if gpus:
            raise FgicError(f"-g/--gpu {','.join(map(str, gpus))} with --device cpu: drop one of them")
        return torch.device("cpu")
    if device_flag == "cuda" and not cuda:
        raise FgicError("--device cuda: no CUDA GPU is visible here; use --device cpu (or check CUDA_VISIBLE_DEVICES)")
    if gpus and not cuda:
        raise FgicError(f"-g/--gpu {','.join(map(str, gpus))}: no CUDA GPU is visible here; drop -g to train on the "
                        f"CPU")
    if not cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    missing = [g for g in gpus if g >= count]
    if missing:
        raise FgicError(f"-g/--gpu {missing[0]}: this machine shows {count} GPU(s), ids 0..{count - 1}")
    if gpus and local_rank >= len(gpus):
        raise FgicError(f"-g/--gpu names {len(gpus)} GPU(s) but this node runs {local_rank + 1}+ processes",
                        shown=True)  # said by the processes past the list (run_cli: else by local rank 0 only)
    return torch.device("cuda", gpus[local_rank] if gpus else local_rank % count)


class Dist:
    """This process's place in the job: rank, world size, device, and the few collectives fgic needs."""

    def __init__(self, launch: Launch, device: torch.device):
        self.launch, self.device = launch, device
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank
        self.is_main = self.rank == 0
        self.setup_group = None  # the patient process group of set-up steps (SETUP_TIMEOUT), made by start()

    @classmethod
    def start(cls, launch: Launch, device: torch.device) -> "Dist":
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if launch.world_size > 1:
            if launch.kind == "srun":  # torchrun exports these itself
                if launch.rank == 0:
                    check_port(launch.master_addr, launch.master_port)
                os.environ.setdefault("MASTER_ADDR", launch.master_addr)
                os.environ.setdefault("MASTER_PORT", str(launch.master_port))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                    rank=launch.rank, world_size=launch.world_size, timeout=COLLECTIVE_TIMEOUT)
        d = cls(launch, device)
        if launch.world_size > 1:
            d.setup_group = dist.new_group(timeout=SETUP_TIMEOUT)
        return d

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes, in place; returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait for every process, as patiently as a set-up step (it follows rank 0's checkpoint write)."""
        if self.distributed:
            dist.barrier(group=self.setup_group)

    def agree(self, fn, during: str = "set-up"):
        """Run a step on every process (a set-up step, rank 0's checkpoint write); if it fails on any, all of them
        raise (none waits for a dead peer), and each message is printed once: by the lowest rank that has it. The
        others wait for the slowest one up to SETUP_TIMEOUT, not the training collectives' shorter timeout."""
        error = None
        try:
            result = fn()
        except FgicError as exc:
            error = exc
        if self.distributed:
            failed = torch.tensor([float(error is not None)], device=self.device)
            dist.all_reduce(failed, group=self.setup_group)
            if failed.item():
                messages = [None] * self.world_size
                dist.all_gather_object(messages, None if error is None else str(error), group=self.setup_group)
                if error is None:
                    first = next(rank for rank, message in enumerate(messages) if message is not None)
                    raise FgicError(f"another process failed during {during}; rank {first} printed its message",
                                    shown=True)
                error.shown = str(error) not in messages[:self.rank]
        if error is not None:
            raise error
        return result

    def max(self, value: int) -> int:
        """The largest of the ranks' values of a small integer, on every rank."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj, patient: bool = False) -> list:
        """Every rank's value of a small picklable object, in rank order, on every rank; `patient`: waiting for the
        slowest rank as long as a set-up step (SETUP_TIMEOUT)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.setup_group if patient else None)
        return out

    def close(self) -> None:
        """Tear the process group down. Callers drop their DDP model first: a DDP module alive at interpreter exit
        makes gloo abort ("terminate called without an active exception") in about a quarter of runs."""
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
