"""Where we run, without torch: how this process was started (`detect`), the Slurm rendezvous, a node's GPUs, the -g
ids, and the one function that builds a command running fgic.ddp (plain Python, or torchrun)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass

from fgic import signals
from fgic.errors import FgicError

FGIC_DDP = ("-m", "fgic.ddp")


@dataclass(frozen=True)
class Launch:
    """How this process was started and where it sits among its peers."""
    kind: str  # the rendezvous: "single", "torchrun" (RANK, WORLD_SIZE, MASTER_* in the environment) or "srun"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = ""  # what started it, for config.json: `kind`, or "submitit" (which exports torchrun's variables)

    def __post_init__(self):
        if not self.launcher:
            object.__setattr__(self, "launcher", self.kind)


def detect(env: os._Environ | dict = os.environ) -> Launch:
    """torchrun sets RANK/WORLD_SIZE; srun steps set SLURM_PROCID/SLURM_NTASKS/SLURM_STEP_ID; else a single process.

    A batch script (sbatch without srun) also carries SLURM_NTASKS but no step id: it runs as a single process.
    A submitit job is told by the variables submitit sets in its jobs (Slurm, local and debug executors).
    """
    by_submitit = any(k in env for k in ("SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_DEBUG_JOB_ID"))
    launcher = "submitit" if by_submitit else ""
    kind = rendezvous(env)
    if kind == "torchrun":  # RANK and WORLD_SIZE set by hand in a Slurm step may come without the LOCAL_ ones
        here = int(env.get("LOCAL_WORLD_SIZE", slurm_tasks_here(env) if "SLURM_LOCALID" in env else 1))
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), local_rank(env), here,
                      env.get("MASTER_ADDR"), _int_or_none(env.get("MASTER_PORT")), launcher)
    if kind == "srun":
        addr, port = slurm_master(env)
        return Launch("srun", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), local_rank(env),
                      slurm_tasks_here(env), addr, port, launcher)
    return Launch("single", launcher=launcher)


def slurm_tasks_here(env: os._Environ | dict = os.environ) -> int:
    """The step's tasks on this node: SLURM_STEP_TASKS_PER_NODE ("4(x2),1": 4 on nodes 0 and 1, 1 on node 2) at
    SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1"))
    counts = [int(n) for n, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec) for _ in range(int(times or 1))]
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else counts[0]


def rendezvous(env: os._Environ | dict = os.environ) -> str:
    """detect's kind, from the environment alone (no scontrol, nothing raised)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if env.get("SLURM_STEP_ID", env.get("SLURM_STEPID")) is not None and int(env.get("SLURM_NTASKS", 1)) > 1:
        return "srun"
    return "single"


def local_rank(env: os._Environ | dict = os.environ) -> int:
    """This process's place on its node (detect's local_rank), for a node's first process to speak for the node."""
    kind = rendezvous(env)
    if kind == "torchrun":
        return int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return int(env.get("SLURM_LOCALID", 0)) if kind == "srun" else 0


def slurm_master(env: os._Environ | dict = os.environ) -> tuple[str, int]:
    """The rendezvous of a Slurm job: MASTER_ADDR or its first host (what init_process_group's env:// then uses
    too), and MASTER_PORT or a port derived from the job id."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise FgicError("Slurm sets no SLURM_JOB_NODELIST here: run inside an allocation (sbatch/salloc) or use "
                        "torchrun")
    port = _int_or_none(env.get("MASTER_PORT")) or 10000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
    return env.get("MASTER_ADDR") or first_host(nodelist), port


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list, by `scontrol show hostnames` where available ("gpu[003-005],cpu1" ->
    "gpu003")."""
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


def local_gpus(env: os._Environ | dict = os.environ) -> int:
    """GPUs this node may use: Slurm's allocation, else CUDA_VISIBLE_DEVICES, else what torch sees."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    # only when nothing above says: launch.torchrun then execs torchrun, and torch costs it a second or two to load
    import torch  # noqa: PLC0415
    return torch.cuda.device_count()


def nodes(env: os._Environ | dict = os.environ) -> int:
    """The nodes of the Slurm job this runs in (1 outside Slurm)."""
    return int(env.get("SLURM_NNODES", 1)) if env.get("SLURM_JOB_ID") else 1


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


def command(args: list[str], nproc_per_node: int = 1, *, nnodes: int = 1, node_rank: int = 0,
            master: tuple[str, int] | None = None, program: tuple[str, ...] = FGIC_DDP) -> list[str]:
    """The command line running `program` (fgic.ddp, or a script) with `args`. One process in all is plain Python, so
    its exit code (2 for bad input, 75 for "stopped, resume me") reaches the caller: torchrun turns any failure into 1.
    Otherwise torchrun: its standalone rendezvous on one node (it picks a free port itself), `master` on several."""
    if nnodes == 1 and nproc_per_node == 1:
        return [sys.executable, *program, *args]
    if nnodes == 1:
        rendezvous = ["--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        rendezvous = [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc_per_node}",
                      f"--master_addr={master[0]}", f"--master_port={master[1]}"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, *program, *args]


def relaunch_per_gpu(gpus: list[int], argv: list[str]) -> None:
    """`python -m fgic.ddp -g 0,1` on a workstation: replace this process by torch's launcher, one process per GPU."""
    cmd = command(argv, len(gpus))
    print("fgic: starting one process per GPU:", " ".join(cmd), file=sys.stderr, flush=True)
    signals.hold()
    os.execv(sys.executable, cmd)
