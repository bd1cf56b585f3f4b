"""`python -m launch.torchrun [fgic.ddp flags]`: start fgic.ddp through torchrun with the rendezvous worked out.

Inside a Slurm allocation (one task per node: `srun --ntasks-per-node=1 python -m launch.torchrun ...`): the first
host of the node list and a port derived from the job id (or MASTER_PORT), this node's rank, and one process per
allocated GPU (one on the CPU). Outside Slurm: one process per visible GPU. One process in all is a plain process,
not torchrun, so its exit code (2 for bad input, 75 for "stopped, resume me") reaches the job; torchrun turns any
failure into 1.
"""
from __future__ import annotations

import os
import sys

from fgic import signals


def local_gpus(env) -> int:
    """GPUs this node may use: Slurm's allocation, else CUDA_VISIBLE_DEVICES, else what torch sees."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    import torch
    return torch.cuda.device_count()


def command(argv: list[str], env=os.environ) -> list[str]:
    """The command line that runs fgic.ddp here."""
    from fgic.dist import slurm_master  # imports torch: after main() has held the stop signals back

    gpus = local_gpus(env)
    per_node = max(gpus, 1)
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NNODES") and (per_node > 1 or int(env["SLURM_NNODES"]) > 1):
        addr, port = slurm_master(env)
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={env['SLURM_NNODES']}",
                f"--node_rank={env.get('SLURM_NODEID', 0)}", f"--nproc_per_node={per_node}",
                f"--master_addr={addr}", f"--master_port={port}", "-m", "fgic.ddp", *argv]
    if gpus <= 1:
        return [sys.executable, "-m", "fgic.ddp", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "fgic.ddp", *argv]


def main() -> None:
    signals.hold()  # a warning during start-up waits for fgic.ddp's handlers
    cmd = command(sys.argv[1:])
    print("launch.torchrun:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
