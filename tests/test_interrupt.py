"""Ctrl-C on a workstation: the first SIGINT stops at the next step boundary with a checkpoint (exit 130, no
requeue) and the same command resumes bitwise; a second one stops at once. The command runs in its own session, as a
terminal's foreground job, and the SIGINT goes to its whole process group: torchrun there passes it on to each
worker's own group (its workers and their loader workers)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
import torch

from fgic import cluster
from fgic.signals import EXIT_INTERRUPTED
from tests.helpers import REPO, fgic_env, read_jsonl, run_fgic, same_result, workers
from tests.test_resume import RUN, STEP_SLEEP, args_for, data8, references, wait_inside_epoch_2  # noqa: F401

pytestmark = pytest.mark.e2e  # every test here starts processes


def foreground(args: list[str], nproc: int, **env) -> subprocess.Popen:
    """fgic.ddp (torchrun for nproc > 1) as a terminal starts it: a process group of its own."""
    return subprocess.Popen(cluster.command(args, nproc), cwd=REPO, env=fgic_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_checkpoints_and_the_same_command_resumes_bitwise(data8, references, tmp_path, nproc):  # noqa: F811
    """Also in a Slurm job (a fake scontrol that records any call): Ctrl-C is the user's stop, not requeued."""
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol-calls'}\n")
    scontrol.chmod(0o755)
    args = [*args_for(data8, tmp_path, cache="off"), "--workers", "2"]
    run = tmp_path.joinpath(*RUN)
    proc = foreground(args, nproc, SLURM_JOB_ID="4242", PATH=f"{scontrol.parent}:{os.environ['PATH']}", **STEP_SLEEP)
    wait_inside_epoch_2(proc, run)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == (EXIT_INTERRUPTED if nproc == 1 else 1), err  # torchrun: 1 for any failure
    assert err.count("fgic: got SIGINT; stopping at the next step boundary with a checkpoint") == nproc, err
    assert "fgic: stopped by SIGINT at epoch 2, step" in err and "checkpoint written, resume with the same command" \
        in err, err
    assert "killed by signal" not in err and "KeyboardInterrupt" not in err, err  # a loader worker's, a rank's
    assert "requeue" not in err and not (tmp_path / "scontrol-calls").exists(), err
    assert not re.search(r'File ".*/fgic/', err), err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], 0 < ckpt["step"] < 8) == (1, True), (ckpt["epoch"], ckpt["step"])
    assert len(read_jsonl(run / "metrics.jsonl")) == 1

    res = run_fgic(args, nproc=nproc)
    assert res.returncode == 0, res.stderr
    assert f"resuming {run / 'checkpoint.pt'} at epoch 2, step {ckpt['step']}" in res.stdout
    same_result(run, references(nproc))


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_second_ctrl_c_stops_at_once(data8, tmp_path, nproc):  # noqa: F811
    """The second Ctrl-C comes while the stop checkpoint is written (held 60 s by the test hook): the processes end
    at once, the previous checkpoint intact. Under torchrun it reaches the workers as torchrun's SIGTERM."""
    run = tmp_path.joinpath(*RUN)
    proc = foreground(args_for(data8, tmp_path), nproc, FGIC_TEST_STALL_SAVE_S="60", **STEP_SLEEP)
    pids = workers(proc, nproc)
    wait_inside_epoch_2(proc, run)
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.time() + 120
    while not list(run.glob(".checkpoint.pt.*.tmp")):  # the stop checkpoint is being written
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    elapsed = time.time() - t0
    print(f"{nproc} process(es): gone {elapsed:.1f} s after the second Ctrl-C")
    assert elapsed < 20 and all(not os.path.exists(f"/proc/{pid}") for pid in pids), err
    assert "after SIGINT; stopping now, without a checkpoint" in err and "stopped by SIGINT" not in err, err
    assert proc.returncode == (-signal.SIGINT if nproc == 1 else 1), err  # torchrun: 1 for any failure
    assert "Traceback" not in err.split("stopping now")[0] and not re.search(r'File ".*/fgic/', err), err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1  # epoch 1's, intact
