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

from fgic import cluster, config, signals
from fgic.cli import run_cli


def command(argv: list[str], env=os.environ) -> list[str]:
    """The command line that runs fgic.ddp here."""
    per_node = max(cluster.local_gpus(env), 1)
    if cluster.nodes(env) > 1:
        return cluster.command(argv, per_node, nnodes=cluster.nodes(env), node_rank=int(env.get("SLURM_NODEID", 0)),
                               master=cluster.slurm_master(env))
    return cluster.command(argv, per_node)


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(f"{__doc__.strip()}\n\nEvery flag is fgic.ddp's:\n\n{config.get_args_parser().format_help()}")
        return
    signals.hold()  # a warning during start-up waits for fgic.ddp's handlers (and, in a Slurm step, SIGTERM too)
    cmd = command(sys.argv[1:])
    if cluster.nodes(os.environ) > 1 and os.environ.get("SLURM_NODEID", "0") == "0":  # the first host: torchrun's store
        cluster.check_port(*cluster.slurm_master(os.environ))
    print("launch.torchrun:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    run_cli(main, "launch.torchrun")
