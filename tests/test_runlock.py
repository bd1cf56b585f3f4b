"""One training process per run folder (fgic.runlock): a second start is refused while the first may run, and a lock
whose holder is gone (a dead process of this machine, a rebooted machine, an earlier start of the same Slurm job, a
heartbeat older than STALE_S) is taken over; a holder whose lock was taken over stops before writing."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
import torch

from fgic import runlock
from fgic.errors import FgicError
from fgic.runlock import Holder, RunLock, lock_path
from fgic.runlog import RunLog
from tests.helpers import popen, read_jsonl, run_fgic, workers
from tests.test_resume import RUN, STEP_SLEEP, args_for, data8, wait_inside_epoch_2  # noqa: F401


def place(run_dir, holder: Holder, age_s: float = 0.0):
    """A lock file of `holder`, its heartbeat `age_s` seconds old."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(holder)) + "\n")
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def dead_process() -> tuple[int, str]:
    """The pid and start time of a process of this machine that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = runlock._process_start(child.pid)
    child.kill()
    child.wait()
    return child.pid, start


def test_a_second_start_is_refused_while_the_first_holds_the_lock(tmp_path):
    run = tmp_path / "runs" / "cub" / "r"
    with RunLock.take(run, True):
        assert lock_path(run) == tmp_path / "runs" / "cub" / ".r.lock" and lock_path(run).is_file()
        with pytest.raises(FgicError) as err:
            RunLock.take(run, True)
        assert str(err.value).startswith(f"{run} is being trained by pid {os.getpid()} on ")
        assert "run the same command once it has ended, or give another --output-dir / --note" in str(err.value)
        assert RunLock.take(tmp_path / "runs" / "cub" / "other", True).release() is None  # another run: its own lock
    assert not lock_path(run).exists()
    RunLock.take(run, True).release()  # free again


def test_other_ranks_take_nothing(tmp_path):
    with RunLock.take(tmp_path / "r", False) as lock:
        lock.check()
    assert list(tmp_path.iterdir()) == []


def test_the_folders_made_for_the_lock_go_if_nothing_was_written(tmp_path):
    (tmp_path / "runs").mkdir()
    RunLock.take(tmp_path / "runs" / "cub" / "r", True).release()
    assert list(tmp_path.rglob("*")) == [tmp_path / "runs"]
    with RunLock.take(tmp_path / "runs" / "cub" / "r", True):
        (tmp_path / "runs" / "cub" / "r").mkdir()  # the run started: its folder stays
    assert (tmp_path / "runs" / "cub" / "r").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(FgicError, match=r"^--output-dir: cannot write the run folder .*/file/cub/r \(Not a dir"):
        RunLock.take(tmp_path / "file" / "cub" / "r", True)


@pytest.fixture
def squeue(tmp_path, monkeypatch):
    """A squeue on PATH that shows job 5 RUNNING and no other job (ended, purged from its list)."""
    fake = tmp_path / "bin" / "squeue"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$3" = 5 ] && echo RUNNING\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")


JOB77 = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"}
QUIET = runlock.SILENT_S + 10  # seconds without a heartbeat: silent enough for a holder presumed gone


@pytest.mark.parametrize("case", ["dead process", "rebooted", "requeued job", "torchrun restart", "ended job",
                                  "silent"])
def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, capsys, squeue, case):
    me, age = Holder.me(JOB77), 0.0
    if case == "dead process":
        pid, start = dead_process()
        theirs, why = replace(me, token="t", pid=pid, process_start=start), "its process no longer runs"
    elif case == "rebooted":
        theirs, why = replace(me, token="t", boot_id="another-boot"), "its machine has rebooted since"
    elif case == "requeued job":  # on another node: Slurm ended it before the restart, and it has stopped beating
        theirs, age = replace(me, token="t", host="node-b", slurm_restart=1), QUIET
        why = f"an earlier start of this Slurm job (restart 1), and its last heartbeat was {QUIET:.0f} s ago"
    elif case == "torchrun restart":  # an elastic restart put rank 0 on another node
        theirs = replace(me, token="t", host="node-b", torchrun_id="r", torchrun_restart=0)
        me, age = replace(me, torchrun_id="r", torchrun_restart=1), QUIET
        why = "an earlier start of this torchrun run (restart 0)"
    elif case == "ended job":  # squeue no longer shows it (a chained job after a cancel that SIGKILLed it)
        theirs, age, why = replace(me, token="t", host="node-b", slurm_job_id="6"), QUIET, "its Slurm job 6 has ended"
    else:
        theirs, age = replace(me, token="t", host="node-b", slurm_job_id="5"), 600.0
        why = "its last heartbeat was 600 s ago"
    run = tmp_path / "r"
    place(run, theirs, age)
    env = {**JOB77, "TORCHELASTIC_RUN_ID": me.torchrun_id or "", "TORCHELASTIC_RESTART_COUNT": me.torchrun_restart}
    with RunLock.take(run, True, env) as lock:
        assert Holder.parse(lock_path(run).read_text()) == lock.holder != theirs
    err = capsys.readouterr().err
    assert f"fgic: notice: took over the run folder's lock {lock_path(run)} from {theirs}: {why}" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]  # nothing left beside it


@pytest.mark.parametrize("case", ["alive here", "other node", "same job, same start", "running job", "half written",
                                  "requeued job, alive here"])
def test_a_lock_whose_holder_may_run_is_kept(tmp_path, squeue, case):
    me = Holder.me(JOB77)
    run = tmp_path / "r"
    holders = {"alive here": replace(me, token="t"),  # this process stands for a live one
               "other node": replace(me, token="t", host="node-b", slurm_job_id=None, slurm_restart=0),
               "same job, same start": replace(me, token="t", host="node-b"),
               "running job": replace(me, token="t", host="node-b", slurm_job_id="5"),
               # Slurm requeued the job (a node that lost the controller), but its process still runs here
               "requeued job, alive here": replace(me, token="t", slurm_restart=1)}
    if case == "half written":
        lock_path(run).write_text("")
    else:
        place(run, holders[case], age_s=runlock.STALE_S - 60)
    before = lock_path(run).read_text()
    with pytest.raises(FgicError, match=f"^{run} is being trained by "):
        RunLock.take(run, True, JOB77)
    assert lock_path(run).read_text() == before


def test_a_holder_presumed_gone_is_waited_for_until_silent_then_taken_over(tmp_path, capsys):
    """A requeue that starts while its earlier start's heartbeat is recent (killed moments ago): it waits for the
    silence instead of failing the job; a holder that keeps beating is refused when the wait is over."""
    me, run = Holder.me(JOB77), tmp_path / "r"
    place(run, replace(me, token="t", host="node-b", slurm_restart=1), age_s=runlock.SILENT_S - 1.5)
    started = time.monotonic()
    RunLock.take(run, True, JOB77).release()
    assert 1.0 < time.monotonic() - started < 10 and "took over" in capsys.readouterr().err
    with RunLock.take(tmp_path / "s", True, JOB77) as beating:  # earlier restart, same job, beating from afar
        path = lock_path(tmp_path / "s")
        path.write_text(json.dumps(asdict(replace(beating.holder, host="node-b", slurm_restart=1))) + "\n")
        with pytest.raises(FgicError, match=r"it is an earlier start of this Slurm job \(restart 1\), which frees it "
                                            r"after 65 s without a heartbeat"):
            RunLock.take(tmp_path / "s", True, JOB77, wait_s=0.5)


def test_an_unreadable_process_is_taken_for_a_running_one(monkeypatch):
    """/proc mounted with hidepid, another user's process: not known dead."""
    def denied(pid, sig):
        raise PermissionError
    monkeypatch.setattr(os, "kill", denied)
    monkeypatch.setattr(runlock, "_process_start", lambda pid: None)
    assert runlock._running(12345, "678")


def test_a_holder_whose_lock_was_taken_over_or_removed_stops_before_writing(tmp_path):
    run = tmp_path / "r"
    lock = RunLock.take(run, True)
    log = RunLog(run, True, lock=lock)
    log.start({"arch": "resnet18"}, 0)
    log.epoch({"epoch": 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0, "test_acc": 40.0})
    other = place(run, replace(lock.holder, token="other", pid=1))
    with pytest.raises(FgicError, match=r"lock was taken over by pid 1 on .*; stopping without writing more"):
        log.epoch({"epoch": 2, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0, "test_acc": 40.0})
    with pytest.raises(FgicError, match="lock was taken over"):
        log.set_aside()
    mine = lock.holder
    lock.release()
    assert other.is_file()  # the release leaves the new holder's lock alone
    other.unlink()
    with pytest.raises(FgicError, match="lock was removed while this process trained it"):
        RunLock(run, mine).check()
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_the_heartbeat_refreshes_the_lock_until_it_is_taken_over(tmp_path):
    run = tmp_path / "r"
    with RunLock.take(run, True, heartbeat_s=0.05) as lock:
        path = lock_path(run)
        os.utime(path, (time.time() - 1000, time.time() - 1000))
        time.sleep(0.5)
        assert runlock._age(os.stat(path), tmp_path) < 5
        place(run, replace(lock.holder, token="other"), age_s=1000)
        time.sleep(0.5)
        assert runlock._age(os.stat(path), tmp_path) > 900  # not refreshed for the new holder
        assert not lock.beat.is_alive()


def test_a_process_forked_from_the_holder_does_not_release_it(tmp_path):
    """A loader worker forked from rank 0 that tears down its copy of the lock."""
    run = tmp_path / "r"
    with RunLock.take(run, True):
        pid = os.fork()
        if pid == 0:
            RunLock(run, Holder.parse(lock_path(run).read_text())).release()
            os._exit(0)
        os.waitpid(pid, 0)
        assert lock_path(run).is_file()


def test_a_lock_replaced_after_it_was_judged_stale_is_not_removed(tmp_path, monkeypatch):
    """Two starts judge one stale lock; the other one breaks it and takes its own before this one breaks: this one
    must not remove the fresh lock, but look again and be refused."""
    run = tmp_path / "r"
    place(run, replace(Holder.me({}), token="stale", host="node-b"), age_s=1000)
    fresh = replace(Holder.me({}), token="fresh", host="node-c")
    age = runlock._age

    def judged_then_replaced(stat, folder):
        monkeypatch.setattr(runlock, "_age", age)
        lock_path(run).unlink()
        place(run, fresh)
        return age(stat, folder)
    monkeypatch.setattr(runlock, "_age", judged_then_replaced)
    with pytest.raises(FgicError, match=f"^{run} is being trained by pid {fresh.pid} on node-c"):
        RunLock.take(run, True)
    assert Holder.parse(lock_path(run).read_text()) == fresh and [p.name for p in tmp_path.iterdir()] == [".r.lock"]


def test_a_failed_read_stops_neither_the_holder_nor_its_heartbeat(tmp_path, monkeypatch):
    """EIO once (a Lustre eviction, an NFS soft-mount timeout): proof of nothing."""
    run = tmp_path / "r"
    with RunLock.take(run, True, heartbeat_s=0.05) as lock:
        read = type(lock.path).read_text
        failures = [OSError(5, "Input/output error")] * 3

        def flaky(self, *a, **k):
            if self == lock.path and failures:
                raise failures.pop()
            return read(self, *a, **k)
        monkeypatch.setattr(type(lock.path), "read_text", flaky)
        lock.check()
        time.sleep(0.5)
        assert not failures and lock.beat.is_alive()
        os.utime(lock.path, (time.time() - 1000, time.time() - 1000))
        time.sleep(0.5)
        assert runlock._age(os.stat(lock.path), tmp_path) < 5  # still beating


def test_a_lock_whose_write_fails_is_not_left_half_written(tmp_path, monkeypatch):
    """A full disk or quota at the lock's write: one line, and no empty lock to refuse the next start."""
    def full(fd):
        raise OSError(122, "Disk quota exceeded")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FgicError, match=r"^--output-dir: cannot write the run folder .*/r \(Disk quota exceeded\)"):
        RunLock.take(tmp_path / "runs" / "r", True)
    assert list(tmp_path.iterdir()) == []


def _contend(run, barrier, results):
    barrier.wait()
    try:
        lock = RunLock.take(run, True)
        results.put("took")
        time.sleep(1.0)  # held while the others look
        lock.release()
    except FgicError as exc:
        results.put(str(exc))


@pytest.mark.e2e
def test_starts_racing_for_a_stale_lock_let_exactly_one_through(tmp_path):
    """Six processes at once on a stale lock: one takes it, the others are refused with the holder's line."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(3):
        run = tmp_path / f"r{attempt}"
        place(run, replace(Holder.me({}), token="t", host="node-b"), age_s=1000)
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(run, barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join()
        assert got[-1] == "took" and got.count("took") == 1, got
        assert all(g.startswith(f"{run} is being trained by ") for g in got[:-1]), got  # a holder, or one mid-write
        assert not lock_path(run).exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.e2e
def test_the_same_command_twice_on_two_processes_refuses_the_second_and_the_first_goes_on(data8, tmp_path):  # noqa: F811
    args = args_for(data8, tmp_path, cache="off", extra=("--epochs", "100"))  # still training when the second starts
    run = tmp_path.joinpath(*RUN)
    first = popen(args, 2, **STEP_SLEEP)
    pids = workers(first, 2)
    wait_inside_epoch_2(first, run)
    second = run_fgic(args, nproc=2)
    held = re.findall(rf"^fgic\.ddp: error: {re.escape(str(run))} is being trained by pid (\d+) on "
                      rf"{re.escape(socket.gethostname())}, since .*; run the same command once it has ended",
                      second.stderr, re.M)
    assert second.returncode != 0 and len(held) == 1 and int(held[0]) in pids, second.stderr
    assert re.search(r"^fgic\.ddp: error: another process failed during set-up; rank 0 printed its message$",
                     second.stderr, re.M), second.stderr  # each rank's line whole, even under PYTHONUNBUFFERED=1
    assert not re.search(r'File ".*/fgic/', second.stderr), second.stderr
    assert first.poll() is None  # the first goes on; stopped now as Slurm would
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert "checkpoint written, resume with the same command" in err, err
    epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 1, epochs
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == len(epochs) and not lock_path(run).exists()


@pytest.mark.e2e
def test_a_killed_run_leaves_its_lock_and_the_same_command_takes_it_over_at_once(data8, tmp_path):  # noqa: F811
    """SIGKILL (the OOM killer, a node's watchdog): no release; on the same machine the lock is known to be free."""
    args = args_for(data8, tmp_path, cache="off")
    run = tmp_path.joinpath(*RUN)
    first = popen(args, 1, **STEP_SLEEP)
    wait_inside_epoch_2(first, run)
    first.kill()
    first.communicate(timeout=60)
    assert Holder.parse(lock_path(run).read_text()).pid == first.pid
    res = run_fgic(args)
    assert res.returncode == 0, res.stderr
    assert f"took over the run folder's lock {lock_path(run)} from pid {first.pid} on " in res.stderr, res.stderr
    assert "its process no longer runs" in res.stderr and f"resuming {run / 'checkpoint.pt'} at epoch 2" in res.stdout
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2] and not lock_path(run).exists()
