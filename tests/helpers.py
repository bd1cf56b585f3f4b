"""Shared test helpers: the tiny CPU run's flags, a runner for fgic.ddp as one process or under torchrun, and the
comparisons of runs (the fixtures are in conftest.py; the tiny datasets come from fgic.demo.make_tiny)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fgic import cluster, engine, optim

REPO = Path(__file__).resolve().parents[1]
# Small enough for CPU tests: resnet18 at 64 px (smaller inputs leave 1x1 maps whose BatchNorm statistics over a
# few values make training chaotic), global batch 12 (splits over 1, 2 and 3 processes), 2 steps per epoch.
TINY = {"arch": "resnet18", "weights": "none", "resize": 72, "crop": 64, "padding": 4, "batch-size": 12, "epochs": 2,
        "device": "cpu", "workers": 0}


def train_step(model, images, labels, optimizer, scaler, criterion, device: torch.device, amp: str,
               clip_grad_norm: float | None = None, keys: torch.Tensor | None = None):
    """A plain PyTorch step through fgic's parts: `engine.forward`, then a bare optimizer and GradScaler
    (`optim.backward_step`) without a run's schedule or EMA; returns (loss, logits)."""
    loss, out = engine.forward(model, images, labels, criterion, device, amp, keys)
    optim.backward_step(loss, optimizer, scaler, clip_grad_norm)
    return loss, out


def optional(name: str):
    """The optional extra, or a skip where it is not installed; CI installs it, so there it fails instead."""
    try:
        return __import__(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the {name} tests, but {name} is not installed")
        pytest.skip(f"needs the optional extra {name} (pip install {name})")


def tiny_args(**overrides) -> list[str]:
    """fgic.ddp flags for the tiny CPU runs, e.g. tiny_args(epochs=3, batch_size=6)."""
    opts = {**TINY, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))] + ["--deterministic"]


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state_dicts' floating-point tensors."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def fgic_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_",
                                                                      "SLURM_", "TORCHELASTIC"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def run_fgic(args: list[str], nproc: int = 1, timeout: int = 600, program: tuple[str, ...] = cluster.FGIC_DDP,
             **env) -> subprocess.CompletedProcess:
    """`python -m fgic.ddp ARGS` (nproc 1) or `torchrun --standalone --nproc_per_node=N -m fgic.ddp ARGS` (or another
    `program`, e.g. ("-m", "tests.rounding_control"))."""
    return subprocess.run(cluster.command(args, nproc, program=program), cwd=REPO, env=fgic_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_weights(run: Path) -> dict:
    """A run folder's last weights: its checkpoint's model state_dict."""
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


TIMING = ("epoch_seconds", "train_images_per_second")


def same_result(run: Path, reference: Path) -> None:
    """A resumed run ended exactly as the uninterrupted one: bitwise weights, the same records but for timings."""
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"] == 0
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items()), "weights differ"
    assert a.keys() == b.keys() and all(torch.equal(v, b["model_ema"][k]) for k, v in a.get("model_ema", {}).items())
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    ours, theirs = (strip(read_jsonl(r / "metrics.jsonl")) for r in (run, reference))
    assert ours == theirs, [(r["epoch"], k, v, t.get(k)) for r, t in zip(ours, theirs) for k, v in r.items()
                            if v != t.get(k)]
    ours, theirs = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert {k: v for k, v in ours.items() if k != "wall_seconds"} == \
           {k: v for k, v in theirs.items() if k != "wall_seconds"}


def popen(args: list[str], nproc: int = 1, **env) -> subprocess.Popen:
    """Start fgic.ddp in the background (under torchrun for nproc > 1)."""
    return subprocess.Popen(cluster.command(args, nproc), cwd=REPO, env=fgic_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def workers(proc: subprocess.Popen, nproc: int) -> list[int]:
    """The training processes: the process itself, or torchrun's children."""
    if nproc == 1:
        return [proc.pid]
    for _ in range(600):
        pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if len(pids) == nproc:
            return [int(p) for p in pids]
        time.sleep(0.1)
    raise AssertionError("torchrun did not start its workers")


class PickledCode:
    """An object whose unpickling would create `marker`: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def wait_for_memory(need_gb: float, seconds: float = 900) -> float:
    """MemAvailable once it reaches `need_gb`, or what it is after `seconds`. The tests that take GBs wait for them
    before they start (the arch sweep's largest shards ~8.5 GB, the Slurm lab ~8 GB, a family ~5 GB): on CI's 24 GB a
    shard that waited only for itself was OOM-killed when the others started beside it (CI run of 2026-12-04)."""
    deadline = time.monotonic() + seconds
    while (have := available_gb()) < need_gb and time.monotonic() < deadline:
        time.sleep(5)
    return have


def available_gb() -> float:
    """The memory Linux can hand out now (MemAvailable), or infinity where there is no /proc/meminfo."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return math.inf
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines())
    return int(fields["MemAvailable"].split()[0]) / 2**20


def interrupt_prepare_after(monkeypatch, placed: int) -> None:
    """fgic.prepare raises KeyboardInterrupt after placing `placed` images: a conversion stopped mid-way."""
    from fgic import prepare

    real_place, calls = prepare.place, []

    def place_then_die(src, target, mode):
        if len(calls) == placed:
            raise KeyboardInterrupt
        calls.append(src)
        return real_place(src, target, mode)

    monkeypatch.setattr(prepare, "place", place_then_die)
