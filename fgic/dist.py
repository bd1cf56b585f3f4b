"""Where we run: detect torchrun / srun / a single process, pick the device, start and stop torch.distributed, reduce."""
from __future__ import annotations

import datetime
import gc
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fgic import signals
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


@dataclass(frozen=True)
class Launch:
    """How this process was started and where it sits among its peers."""
    kind: str  # "single", "torchrun" or "srun"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None


def detect(env: os._Environ | dict = os.environ) -> Launch:
    """torchrun sets RANK/WORLD_SIZE; srun steps set SLURM_PROCID/SLURM_NTASKS/SLURM_STEP_ID; else a single process.

    A batch script (sbatch without srun) also carries SLURM_NTASKS but no step id: it runs as a single process.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      int(env.get("LOCAL_WORLD_SIZE", 1)), env.get("MASTER_ADDR"), _int_or_none(env.get("MASTER_PORT")))
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is not None and int(env.get("SLURM_NTASKS", 1)) > 1:
        addr, port = slurm_master(env)
        tasks_here = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1"))
        return Launch("srun", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      int(re.match(r"\d+", tasks_here).group()), addr, port)
    return Launch("single")


def slurm_master(env: os._Environ | dict = os.environ) -> tuple[str, int]:
    """The rendezvous of a Slurm job: its first host, and MASTER_PORT or a port derived from the job id."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise FgicError("Slurm sets no SLURM_JOB_NODELIST here: run inside an allocation (sbatch/salloc) or use torchrun")
    port = _int_or_none(env.get("MASTER_PORT")) or 10000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
    return first_host(nodelist), port


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list, by `scontrol show hostnames` where available ("gpu[003-005],cpu1" -> "gpu003")."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    # Fallback for a node list without scontrol: prefix plus the first number of the first bracket.
    m = re.match(r"([^,\[]+)(?:\[([^],-]+))?", nodelist)
    return m.group(1) + (m.group(2) or "")


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value else None


def check_port(host: str, port: int, env: os._Environ | dict = os.environ) -> None:
    """On the rendezvous host, before the store listens: a port taken by another job or service is one line naming
    MASTER_PORT and a port that is free now, not a bind error on one rank while the others wait for it. Bound with
    SO_REUSEADDR, as torch's store binds: a requeued job's own connections in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
            return
        except OSError:
            pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as free:
        free.bind(("", 0))
        spare = free.getsockname()[1]
    given = "MASTER_PORT" if env.get("MASTER_PORT") else f"the port derived from job {env.get('SLURM_JOB_ID')}"
    raise FgicError(f"rendezvous port {port} on {host} ({given}) is in use, by another job or service; set "
                    f"MASTER_PORT to a free one for this job, e.g. `export MASTER_PORT={spare}` before sbatch/srun")


def parse_gpus(gpu_flag: str | None) -> list[int]:
    if not gpu_flag:
        return []
    try:
        gpus = [int(g) for g in gpu_flag.split(",") if g.strip()]
    except ValueError:
        raise FgicError(f"-g/--gpu {gpu_flag!r}: give GPU ids such as 0 or 0,1,2,3") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) < len(gpus):
        raise FgicError(f"-g/--gpu {gpu_flag}: give each GPU id once, 0 or more (e.g. 0,1,2,3)")
    return gpus


def relaunch_per_gpu(gpus: list[int], argv: list[str]) -> None:
    """`python -m fgic.ddp -g 0,1` on a workstation: replace this process by torch's launcher, one process per GPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(gpus)}",
           "-m", "fgic.ddp", *argv]
    print("fgic: starting one process per GPU:", " ".join(cmd), file=sys.stderr, flush=True)
    signals.hold()
    os.execv(sys.executable, cmd)


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
        raise FgicError(f"-g/--gpu {','.join(map(str, gpus))}: no CUDA GPU is visible here; drop -g to train on the CPU")
    if not cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    missing = [g for g in gpus if g >= count]
    if missing:
        raise FgicError(f"-g/--gpu {missing[0]}: this machine shows {count} GPU(s), ids 0..{count - 1}")
    if gpus and local_rank >= len(gpus):
        raise FgicError(f"-g/--gpu names {len(gpus)} GPU(s) but this node runs {local_rank + 1}+ processes")
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

    def agree(self, fn):
        """Run a set-up step on every process; if it fails on any, all of them raise (none waits for a dead peer).
        The others wait for the slowest one up to SETUP_TIMEOUT, not the training collectives' shorter timeout."""
        error = None
        try:
            result = fn()
        except FgicError as exc:
            error = exc
        if self.distributed:
            failed = torch.tensor([float(error is not None)], device=self.device)
            dist.all_reduce(failed, group=self.setup_group)
            if failed.item() and error is None:
                raise FgicError("another process failed during set-up; its message is above")
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

    def gather(self, obj) -> list:
        """Every rank's value of a small picklable object, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Tear the process group down. Callers drop their DDP model first: a DDP module alive at interpreter exit
        makes gloo abort ("terminate called without an active exception") in about a quarter of runs."""
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
