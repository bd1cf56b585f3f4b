"""`python -m tests.compile_fails RANK EMPTY_DIR ARGS`: fgic.ddp ARGS, where the process of rank RANK has no working
C++ compiler for inductor (CXX names no file, read by torch._inductor.config when it is imported) and EMPTY_DIR, a
folder the test owns, as its inductor cache (a cached kernel would need no compiler): torch.compile fails for real on
that rank alone."""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    if os.environ.get("RANK", "0") == sys.argv[1]:
        os.environ["CXX"] = "/nonexistent/c++"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = sys.argv[2]
    sys.argv[1:] = sys.argv[3:]
    from fgic import ddp  # noqa: PLC0415  (after CXX is set: inductor's config reads it on import)

    ddp.cli()
