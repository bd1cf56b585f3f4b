"""--compile: the training step through torch.compile, decided the same way on every rank, and its compile cache.

torch.compile fails lazily, at the first step (no working C++ compiler for inductor's CPU kernels, a Triton that
cannot build, an op the backend cannot lower). fgic compiles through a backend that tries inductor and agrees on
the outcome with every rank before the graph runs; if inductor failed on any of them, rank 0 prints one warning
line and every rank trains the eager module from that very step on, with the eager arithmetic (the step's buffers
put back first: the graphs before a graph break have run, and BatchNorm's statistics would count the step twice).

Caches: inductor's (TORCHINDUCTOR_CACHE_DIR, unless the user set one) goes into the node-local folder of the
decoded-image cache (--cache-dir, $FGIC_CACHE or fgic-cache-UID in $TMPDIR or /tmp), where fast local disk and
working file locks are, shared by the node's runs; and, where torch has its portable "mega-cache"
(torch.compiler.save_cache_artifacts, torch >= 2.7), rank 0 writes it to RUN_DIR/compile-cache.bin once the step
has compiled, and every process loads it before compiling: a run requeued onto another node, or into a job whose
private $TMPDIR was wiped, finds its kernels in its own run folder.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.utils import counters

from fgic import cache
from fgic.dist import Dist
from fgic.jsonfile import write_bytes

CACHE_FILE = "compile-cache.bin"  # the run folder's mega-cache


class CompileFailed(Exception):
    """Raised by the backend on every rank once the ranks agree that inductor failed on one of them."""


class Compiled(nn.Module):
    """`module` through torch.compile (mode `mode`), or, once the compile failed on any rank, `module` itself.
    `compiled` says whether every step so far ran compiled. The eager module is `_orig_mod`, as in torch's own
    wrapper (fgic.engine.unwrapped finds it)."""

    def __init__(self, module: nn.Module, dist: Dist, mode: str, run_dir: Path):
        super().__init__()
        self._orig_mod = module
        self.dist, self.mode, self.run_dir = dist, mode, run_dir
        self.compiled, self.compiles, self.saved = True, 0, 0
        self.reason = None
        self.kept: list[torch.Tensor] | None = None  # the buffers before a training step (see forward)
        inductor = torch._TorchCompileInductorWrapper(None if mode == "default" else mode, None, None)
        self.__dict__["step"] = torch.compile(module, backend=self._backend(inductor))  # not a submodule

    def _backend(self, inductor):
        def backend(gm, example_inputs):
            return self._agree(lambda: inductor(gm, example_inputs))
        return backend

    def _agree(self, compile_graph):
        """One graph compiled on every rank (dynamo hands every rank the same graphs in the same order: the ranks run
        one program on batches of one shape), or CompileFailed on all of them."""
        reason = None
        try:
            # the backward too, now: compiled lazily, its failure would come in the middle of a step
            patch = ({"force_non_lazy_backward_lowering": True}
                     if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering") else {})
            with torch._functorch.config.patch(**patch):
                compiled = compile_graph()
        except Exception as exc:  # noqa: BLE001  (whatever the compiler raises, the run goes on eager)
            reason = one_line(exc)
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            reasons = self.dist.gather(reason, patient=True)  # a slower rank may still be compiling
        failed = next((r for r in reasons if r is not None), None)
        if failed is not None:
            self.reason = failed
            raise CompileFailed(failed)
        self.compiles += 1
        return compiled

    def forward(self, *args, **kwargs):
        if self.compiled:
            first = self.compiles == 0
            start = time.perf_counter()
            buffers = list(self._orig_mod.buffers()) if self._orig_mod.training else []
            self._keep(buffers)
            try:
                out = self.step(*args, **kwargs)
            except Exception:
                if self.reason is None:  # not the compiler: a real error of the step
                    raise
                out = None  # the step again, eagerly
            if self.reason is not None:  # on every rank (with TORCHDYNAMO_SUPPRESS_ERRORS dynamo ran it eagerly)
                self.compiled = False
                if self.dist.is_main:
                    print(f"fgic: warning: --compile failed ({self.reason}); training eager", file=sys.stderr,
                          flush=True)
                if out is not None:
                    return out
                if buffers:  # graphs before a graph break may have run: BatchNorm's statistics would count twice
                    torch._foreach_copy_(buffers, self.kept)
                return self._orig_mod(*args, **kwargs)
            if self.compiles > self.saved:
                self._compiled_now(time.perf_counter() - start, first)
            return out
        return self._orig_mod(*args, **kwargs)

    def _keep(self, buffers: list[torch.Tensor]) -> None:
        """A copy of the training step's buffers, in one foreach copy into tensors made once (ResNet-50: 161
        buffers, 0.2 MB)."""
        if not buffers:
            return
        if self.kept is None:  # the wrapped module's buffers are fixed once it is compiled
            self.kept = [torch.empty_like(b) for b in buffers]
        torch._foreach_copy_(self.kept, buffers)

    def _compiled_now(self, seconds: float, first: bool) -> None:
        """After a step that compiled: say so (rank 0), and save the mega-cache to the run folder."""
        self.saved = self.compiles
        if not self.dist.is_main:
            return
        hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
        print(f"fgic: --compile: {'first' if first else 'a recompiling'} step {seconds:.1f} s, mode {self.mode}; "
              f"inductor's cache: {hits} graph(s) found, {misses} compiled", flush=True)
        if hasattr(torch.compiler, "save_cache_artifacts"):
            saved = torch.compiler.save_cache_artifacts()
            if saved is not None:
                write_bytes(self.run_dir / CACHE_FILE, saved[0])


def prepare(dist: Dist, run_dir: Path, cache_dir: str | None) -> None:
    """Before the first compile in this process: inductor's cache in the node-local folder (unless
    TORCHINDUCTOR_CACHE_DIR is set), filled from the run folder's mega-cache when there is one."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache.folder(cache_dir) / "inductor"))
    saved = run_dir / CACHE_FILE
    if hasattr(torch.compiler, "load_cache_artifacts") and saved.is_file():
        try:
            torch.compiler.load_cache_artifacts(saved.read_bytes())
        except Exception as exc:  # noqa: BLE001  (a damaged or foreign cache costs a compile, nothing else)
            if dist.is_main:
                print(f"fgic: notice: {saved} not loaded ({one_line(exc)}); compiling afresh", file=sys.stderr,
                      flush=True)


def compiled(module: nn.Module, dist: Dist, mode: str, run_dir: Path, cache_dir: str | None) -> Compiled:
    """--compile's step module (see the module's doc)."""
    prepare(dist, run_dir, cache_dir)
    return Compiled(module, dist, mode, run_dir)


def one_line(exc: BaseException) -> str:
    """An exception as `Type: its first line`, at most 200 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200].rstrip(": ")
