"""`python -m launch.torchrun [fgic.ddp flags]`: start fgic.ddp through torchrun with the rendezvous worked out.

Inside a Slurm allocation (one task per node: `srun --ntasks-per-node=1 python -m launch.torchrun ...`): one process
per allocated GPU (one on the CPU); on several nodes, the first host of the node list and a port derived from the
job id (or MASTER_PORT), checked on that host before torchrun starts, and this node's rank. On one node (and outside
Slurm, one process per visible GPU) torchrun's standalone rendezvous picks a free port itself. One process in all is
a plain process, not torchrun, so its exit code (2 for bad input, 75 for "stopped, resume me") reaches the job;
torchrun turns any failure into 1.
"""
from __future__ import annotations

import os
import sys

from fgic import signals
from fgic.errors import run_cli


def local_gpus(env) -> int:
    """GPUs this node may use: Slurm's allocation, else CUDA_VISIBLE_DEVICES, else what torch sees."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    import torch
    return torch.cuda.device_count()


def nodes(env) -> int:
    """The nodes of the Slurm job this runs in (1 outside Slurm)."""
    return int(env.get("SLURM_NNODES", 1)) if env.get("SLURM_JOB_ID") else 1


def command(argv: list[str], env=os.environ) -> list[str]:
    """The command line that runs fgic.ddp here."""
    from fgic.dist import slurm_master  # imports torch: after main() has held the stop signals back

    per_node = max(local_gpus(env), 1)
    if nodes(env) > 1:
        addr, port = slurm_master(env)
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={env['SLURM_NNODES']}",
                f"--node_rank={env.get('SLURM_NODEID', 0)}", f"--nproc_per_node={per_node}",
                f"--master_addr={addr}", f"--master_port={port}", "-m", "fgic.ddp", *argv]
    if per_node == 1:
        return [sys.executable, "-m", "fgic.ddp", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={per_node}",
            "-m", "fgic.ddp", *argv]


def main() -> None:
    signals.hold()  # a warning during start-up waits for fgic.ddp's handlers (and, in a Slurm step, SIGTERM too)
    cmd = command(sys.argv[1:])
    if nodes(os.environ) > 1 and os.environ.get("SLURM_NODEID", "0") == "0":  # the first host: torchrun's store
        from fgic.dist import check_port, slurm_master
        check_port(*slurm_master(os.environ))
    print("launch.torchrun:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    run_cli(main, "launch.torchrun")
