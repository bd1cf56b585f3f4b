"""`python -m tests.old_order ARGS`: fgic.ddp ARGS in the training order of runs from before the keyed order
(samplers.ORDERS' "seed+epoch"), which a run resumed from such a checkpoint keeps: the seed recipe's records pinned
before it (tests/data/seed_recipe_tiny.json) are this order's."""
from __future__ import annotations

import sys

from fgic import ddp
from fgic.cli import run_cli

if __name__ == "__main__":
    ddp.ORDER = "seed+epoch"
    run_cli(lambda: ddp.main(sys.argv[1:]), "fgic.ddp")
