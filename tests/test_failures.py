"""Crashes: a kill -9 during a checkpoint write loses nothing; one dead rank takes the others down quickly."""
from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
import torch

from fgic.demo import make_tiny
from tests.helpers import PickledCode, popen, read_jsonl, run_fgic, tiny_args, workers

pytestmark = pytest.mark.e2e  # every test here starts processes

RUN = ("tiny8", "resnet18-off-s2020")
DEATH_BOUND_S = 60  # README, "Failures": all processes gone within this after one rank dies


def args_for(tmp_path, out="runs"):
    data = make_tiny(tmp_path / "tiny8", (16, 16, 16), (4, 4, 4))
    return ["-d", str(data), *tiny_args(epochs=2, batch_size=6), "--output-dir", str(tmp_path / out)]


def wait_for(cond, proc, timeout=300):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)


def test_kill_9_during_a_checkpoint_write_loses_nothing(tmp_path):
    args = args_for(tmp_path)
    run = (tmp_path / "runs").joinpath(*RUN)
    ref = run_fgic(args_for(tmp_path, "ref"))
    assert ref.returncode == 0, ref.stderr
    # The epoch-2 checkpoint overwrites epoch 1's; the hook holds the finished temporary file back before the rename.
    proc = popen(args, FGIC_TEST_STALL_SAVE_S="60")
    wait_for(lambda: (run / "checkpoint.pt").is_file() and list(run.glob(".checkpoint.pt.*.tmp")), proc)
    proc.kill()
    proc.communicate()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the previous one, intact
    res = run_fgic(args)  # the same command resumes from it
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout
    a = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load((tmp_path / "ref").joinpath(*RUN, "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2]


def test_one_dead_rank_takes_the_others_down(tmp_path):
    args = args_for(tmp_path)
    run = (tmp_path / "runs").joinpath(*RUN)
    proc = popen(args, nproc=2)
    pids = workers(proc, 2)
    wait_for(lambda: (run / "config.json").is_file(), proc)  # training has started
    time.sleep(1)
    t0 = time.time()
    os.kill(pids[1], 9)
    proc.communicate(timeout=DEATH_BOUND_S * 3)
    elapsed = time.time() - t0
    print(f"one rank killed: all processes gone after {elapsed:.1f} s")
    assert proc.returncode != 0
    assert elapsed < DEATH_BOUND_S
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids)


def test_a_checkpoint_carrying_code_is_refused_end_to_end(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "epoch": 1, "config": PickledCode(str(marker))}, tmp_path / "evil.pt")
    res = run_fgic(args_for(tmp_path) + ["--resume", str(tmp_path / "evil.pt")])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "evil.pt: refused" in res.stderr.strip().splitlines()[-1]
    assert not marker.exists()


def test_a_slow_epoch_end_save_is_waited_for_past_the_collective_timeout(tiny_data, tmp_path):
    """Rank 0 writes checkpoint.pt at each epoch's end (a large model, a slow shared file system; here the test hook
    holds each overwrite 15 s) while the other rank would already wait in the next epoch's collectives, which give up
    after FGIC_COLLECTIVE_TIMEOUT_S (10 s here, 120 s by default; NCCL's watchdog then aborts the job). It waits for
    the save under the set-up timeout instead."""
    res = run_fgic(["-d", str(tiny_data), *tiny_args(epochs=3), "--output-dir", str(tmp_path)], nproc=2,
                   FGIC_COLLECTIVE_TIMEOUT_S="10", FGIC_TEST_STALL_SAVE_S="15")
    assert res.returncode == 0 and "Timed out" not in res.stderr, res.stderr
    run = tmp_path / "tiny" / "resnet18-off-s2020"
    assert [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


def test_ranks_reading_other_copies_of_the_data_stop_with_one_line(tiny_data, tmp_path):
    """Node-local copies of -d, one incomplete (a copy still running): every rank stops at set-up with one line,
    instead of sharding other lists (other step counts hang at the epoch's end). A file of another size changes the
    fingerprint too (tests/test_data.py)."""
    for rank in (0, 1):
        shutil.copytree(tiny_data, tmp_path / f"r{rank}" / "tiny")
    (tmp_path / "r1" / "tiny" / "train" / "class_00" / "000.jpg").unlink()
    res = run_fgic(["-d", str(tmp_path / "r{rank}" / "tiny"), *tiny_args(epochs=1, batch_size=6), "--output-dir",
                    str(tmp_path / "runs")], nproc=2, program=("-m", "tests.per_rank_data"), timeout=300)
    host, train = socket.gethostname(), 23
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert res.returncode != 0 and errors == [
        f"fgic.ddp: error: -d {tmp_path / 'r0' / 'tiny'}: the processes see other images (rank 0 on {host}: 24 train "
        f"/ 101 test images; rank 1 on {host}: {train} train / 101 test images, not the same files); give every node "
        f"the same, complete copy of the dataset"], res.stderr
    assert not (tmp_path / "runs" / "tiny").exists() or not any((tmp_path / "runs" / "tiny").iterdir())


def test_ranks_whose_devices_resolve_amp_auto_otherwise_stop_with_one_line(tiny_data, tmp_path):
    """A job on unlike GPUs (bf16 beside a V100): -a auto would train rank 1 in fp16 with a GradScaler beside rank 0
    in another mode, averaging scaled gradients with unscaled ones, each rank naming its own run folder."""
    res = run_fgic(["-d", str(tiny_data), *tiny_args(epochs=1, batch_size=6), "--output-dir", str(tmp_path)],
                   nproc=2, program=("-m", "tests.mixed_gpus"), timeout=300)
    host = socket.gethostname()
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert res.returncode != 0 and errors == [
        f"fgic.ddp: error: -a/--amp resolves to other modes on this job's devices (rank 0 on {host} (cpu): off; "
        f"rank 1 on {host} (cpu): fp16); give one mode that every device has, e.g. -a fp16, or run on alike GPUs"], \
        res.stderr
    assert list(tmp_path.iterdir()) == []
