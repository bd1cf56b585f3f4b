"""`python -m tests.compile_fails RANK ARGS`: fgic.ddp ARGS, where the process of rank RANK has no working C++
compiler for inductor (CXX names no file, read by torch._inductor.config when it is imported) and an empty inductor
cache of its own (a cached kernel would need no compiler): torch.compile fails for real on that rank alone."""
from __future__ import annotations

import os
import sys
import tempfile

if __name__ == "__main__":
    if os.environ.get("RANK", "0") == sys.argv[1]:
        os.environ["CXX"] = "/nonexistent/c++"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fgic-no-compiler-")
    sys.argv[1:] = sys.argv[2:]
    from fgic import ddp  # noqa: PLC0415  (after CXX is set: inductor's config reads it on import)

    ddp.cli()
