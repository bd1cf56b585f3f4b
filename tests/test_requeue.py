"""Slurm self-requeue, against a stand-in scontrol on PATH that records its calls."""
import os
import stat

import pytest

from fgic import requeue

pytestmark = pytest.mark.e2e  # every test here starts processes


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    log = tmp_path / "calls"
    script = tmp_path / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                      f'[ "$1" = show ] && echo "JobId=$3 JobState=${{FAKE_STATE:-RUNNING}} '
                      f'Requeue=${{FAKE_REQUEUE:-1}} Restarts=0"\n'
                      f'[ "$1" = requeue ] && [ -n "$FAKE_STEP_KILL" ] && kill -TERM $$\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    return log


def test_requeues_a_requeueable_job(scontrol):
    assert requeue.requeue({"SLURM_JOB_ID": "42"}) == "requeued Slurm job 42"
    assert scontrol.read_text().splitlines() == ["show job 42", "requeue 42"]


def test_array_task_requeues_itself_only(scontrol):
    env = {"SLURM_JOB_ID": "50", "SLURM_ARRAY_JOB_ID": "49", "SLURM_ARRAY_TASK_ID": "1"}
    assert requeue.requeue(env) == "requeued Slurm job 49_1"


def test_no_requeue_when_not_allowed_or_not_ours(scontrol, monkeypatch):
    assert requeue.requeue({}) == "no requeue: not a Slurm job; rerun the same command to resume"
    assert requeue.requeue({"SLURM_JOB_ID": "42", "SUBMITIT_EXECUTOR": "slurm"}) == "requeue left to the launcher"
    assert requeue.requeue({"SLURM_JOB_ID": "42", "FGIC_REQUEUE": "0"}) == "requeue left to the launcher"
    monkeypatch.setenv("FAKE_REQUEUE", "0")
    assert "may not be requeued" in requeue.requeue({"SLURM_JOB_ID": "42"})
    assert "requeue 42" not in scontrol.read_text()


def test_the_requeues_own_sigterm_does_not_fail_it(scontrol, monkeypatch):
    """Slurm ends a requeued job's step with SIGTERM, which may reach scontrol before it exits: held back, it does
    not turn a done requeue into "failed" (the stand-in signals itself the moment it has requeued)."""
    monkeypatch.setenv("FAKE_STEP_KILL", "1")
    assert requeue.requeue({"SLURM_JOB_ID": "42"}) == "requeued Slurm job 42"


def test_a_cancelled_job_is_not_requeued(scontrol, monkeypatch):
    """A plain `scancel` also ends with SIGTERM (fgic checkpoints); the job is COMPLETING by then and stays ended."""
    monkeypatch.setenv("FAKE_STATE", "COMPLETING")
    assert requeue.requeue({"SLURM_JOB_ID": "42"}) == "job 42 is COMPLETING, not running (cancelled?): not requeued"
    assert scontrol.read_text().splitlines() == ["show job 42"]
