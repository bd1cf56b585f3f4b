"""`python -m tests.mixed_gpus ARGS`: fgic.ddp ARGS where the process of rank 1 resolves -a auto to fp16, as a GPU
without bfloat16 beside GPUs that have it does (rank 0 resolves it as its device does: off on the CPU)."""
from __future__ import annotations

import os

if __name__ == "__main__":
    from fgic import ddp, engine  # noqa: PLC0415

    if os.environ.get("RANK") == "1":
        resolve = engine.resolve_amp
        engine.resolve_amp = lambda amp, device: "fp16" if amp == "auto" else resolve(amp, device)
    ddp.cli()
