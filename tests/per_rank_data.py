"""`python -m tests.per_rank_data ARGS`: fgic.ddp ARGS with `{rank}` in them replaced by this process's RANK, so that
each rank reads its own copy of -d, as the nodes of a job that copied the dataset to node-local disks do."""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.argv[1:] = [a.replace("{rank}", os.environ.get("RANK", "0")) for a in sys.argv[1:]]
    from fgic import ddp  # noqa: PLC0415

    ddp.cli()
