"""Slurm self-requeue: after a stop signal's checkpoint, put the job back in the queue when Slurm allows it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

from fgic.signals import term_held


def job_id(env=os.environ) -> str | None:
    """The id to requeue: an array task's own id, or the job's."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def show(job: str) -> str | None:
    """`scontrol show job JOB`, or None when there is no scontrol or it does not answer."""
    if not shutil.which("scontrol"):
        return None
    try:
        return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return None


def ending(info: str) -> str | None:
    """The job's state when `scontrol show job` shows it ending rather than running, else None. A plain `scancel`
    makes it COMPLETING before its processes get their SIGTERM (measured on Slurm 22.05); a signal alone (scancel
    --signal, the time-limit warning) leaves it RUNNING. A cancelled job must not come back."""
    state = re.search(r"\bJobState=(\S+)", info)
    return state.group(1) if state and state.group(1) != "RUNNING" else None


def requeue(env=os.environ) -> str:
    """Requeue this Slurm job if it runs under Slurm, may be requeued (Requeue=1), is still running and no submitit
    job manages it (submitit requeues its own); returns what happened, for the log. FGIC_REQUEUE=0 turns it off."""
    job = job_id(env)
    if not job:
        return "no requeue: not a Slurm job; rerun the same command to resume"
    if env.get("FGIC_REQUEUE", "1") == "0" or env.get("SUBMITIT_EXECUTOR"):
        return "requeue left to the launcher"
    info = show(job)
    if info is None:
        return "no answer from scontrol (is it on PATH?)"
    if "Requeue=1" not in info:
        return f"job {job} may not be requeued (sbatch --requeue allows it)"
    if ending(info):
        return f"job {job} is {ending(info)}, not running (cancelled?): not requeued"
    try:
        with term_held():
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "scontrol did not answer"
    if done.returncode != 0:
        why = done.stderr.strip()[:200] or (f"ended by signal {-done.returncode}" if done.returncode < 0
                                             else f"exit code {done.returncode}")
        return f"scontrol requeue {job} failed: {why}"
    return f"requeued Slurm job {job}"
