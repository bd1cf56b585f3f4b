"""Preemption: a stop signal mid-epoch checkpoints the step boundary, and the resumed run ends bitwise-identical."""
from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
import torch

from fgic.signals import EXIT_PREEMPTED
from tests.conftest import make_dataset, popen, read_jsonl, run_fgic, same_result, tiny_args, workers

RUN = ("tiny8", "resnet18-off-s2020")


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    """48 train images: 8 steps per epoch at the global batch of 6."""
    return make_dataset(tmp_path_factory.mktemp("d") / "tiny8", (16, 16, 16), (10, 10, 10))


def args_for(data, out, cache="auto"):
    return ["-d", str(data), *tiny_args(epochs=2, batch_size=6), "--output-dir", str(out), "--cache", cache]


@pytest.fixture(scope="module")
def references(data8, tmp_path_factory):
    """Uninterrupted runs, one per process count (bitwise equality is promised for the same layout)."""
    cache = {}

    def get(nproc: int):
        if nproc not in cache:
            out = tmp_path_factory.mktemp(f"ref{nproc}")
            res = run_fgic(args_for(data8, out), nproc=nproc)
            assert res.returncode == 0, res.stderr
            cache[nproc] = out.joinpath(*RUN)
        return cache[nproc]
    return get


@pytest.mark.parametrize("sig,nproc,target,cache", [
    pytest.param(signal.SIGUSR2, 1, "all", "auto", id="USR2"),
    pytest.param(signal.SIGTERM, 1, "twice", "auto", id="TERM-twice"),
    pytest.param(signal.SIGUSR1, 1, "all", "auto", id="USR1"),
    pytest.param(signal.SIGUSR2, 2, "one", "auto", id="USR2-torchrun-one-rank"),  # both must stop at the same step
    # the uncached loader resumes mid-epoch too, and ends bitwise as the (cached) reference
    pytest.param(signal.SIGUSR2, 1, "all", "off", id="USR2-cache-off"),
])
def test_stop_mid_epoch_and_resume_bitwise(data8, references, tmp_path, sig, nproc, target, cache):
    args = args_for(data8, tmp_path, cache)
    run = tmp_path.joinpath(*RUN)
    proc = popen(args, nproc)
    pids = workers(proc, nproc)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or not read_jsonl(run / "metrics.jsonl"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    for pid in (pids if target != "one" else pids[-1:]):
        subprocess.run(["kill", f"-{sig.name[3:]}", str(pid)], check=True)
    if target == "twice":  # a second signal while stopping (and saving) changes nothing
        time.sleep(0.3)
        subprocess.run(["kill", f"-{sig.name[3:]}", str(pids[0])], check=False)
    out, err = proc.communicate(timeout=300)
    if nproc == 1:
        assert proc.returncode == EXIT_PREEMPTED, err
    else:
        assert proc.returncode != 0, err
    assert f"stopped by {sig.name}" in err and not re.search(r'File ".*/fgic/', err)  # no traceback of ours
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], 0 < ckpt["step"] < 8) == (1, True), (ckpt["epoch"], ckpt["step"])
    assert len(read_jsonl(run / "metrics.jsonl")) == 1

    res = run_fgic(args, nproc=nproc)  # the same command resumes
    assert res.returncode == 0, res.stderr
    assert f"resuming {run / 'checkpoint.pt'} at epoch 2, step {ckpt['step']}" in res.stdout
    same_result(run, references(nproc))


def test_resume_on_another_world_size(data8, references, tmp_path):
    """Stop on 2 processes, resume on 3: allowed (the layout does not change the run's meaning); the result equals
    the uninterrupted run up to float rounding, not bitwise (bitwise is promised for the same layout). A torn
    metrics.jsonl line first stops the resume with one line on every rank."""
    args = args_for(data8, tmp_path)
    run = tmp_path.joinpath(*RUN)
    proc = popen(args, 2)
    pids = workers(proc, 2)
    while not (run / "metrics.jsonl").is_file() or not read_jsonl(run / "metrics.jsonl"):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    for pid in pids:
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
    proc.communicate(timeout=300)
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert step > 0
    metrics = run / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"epoch": 2, "lr": 0.00')  # as if a node died while appending a record
    res = run_fgic(args, nproc=3)  # every rank stops at set-up with rank 0's one line; nothing is overwritten
    assert res.returncode != 0 and f"fgic.ddp: error: {metrics}: line 2 is not valid JSON" in res.stderr, res.stderr
    assert not re.search(r'File ".*/fgic/', res.stderr), res.stderr  # torchrun's own report follows, no fgic trace
    assert res.stderr.count("another process failed during set-up") == 2
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == step
    metrics.write_text(whole)  # the line removed, as the message says
    res = run_fgic(args, nproc=3)
    assert res.returncode == 0, res.stderr
    assert f"at epoch 2, step {step}" in res.stdout
    ours, ref = read_jsonl(run / "metrics.jsonl"), read_jsonl(references(2) / "metrics.jsonl")
    assert [m["epoch"] for m in ours] == [1, 2] and ours[-1]["test_total"] == 30
    assert ours[1]["train_loss"] == pytest.approx(ref[1]["train_loss"], rel=1e-2)
