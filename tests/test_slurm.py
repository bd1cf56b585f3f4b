"""fgic on a real one-node Slurm (`bash tests/slurm/cluster.sh start`): the sweep and train templates, the submitit
sweep, preemption by scancel --signal (TERM and USR2, to every process of 2-process steps: torchrun on 2 GPUs, or 2
srun tasks, loader workers included) and by the time-limit warning, a plain scancel, and a failed combination.

The module submits all its jobs at once so that they overlap; each test then waits for its own. In CI (CI set) a
cluster that is not up fails the tests; elsewhere they skip and say how to start one."""
from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fgic import cluster
from fgic.demo import make_tiny
from tests.helpers import REPO, fgic_env, optional, read_jsonl, same_result, tiny_args, wait_for_memory

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

LAB_GB = 8  # the lab's ~12 jobs at once hold up to ~8 GB for minutes
TRAIN, SWEEP = str(REPO / "slurm" / "train.sbatch"), str(REPO / "slurm" / "sweep.sh")
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the templates ask for GPUs; these jobs train on the CPU
RUN = "resnet18-off-s2020"  # tiny_args()'s run name
# The preempted runs: with FGIC_TEST_STEP_SLEEP_S=4 (SLOW_STEP_S), 8 s or more an epoch on any machine, 40 s or more
# after their first epoch, in which the test signals them. 6 epochs at 4 s, not 12 at 2: the same time for the test to
# act in, half the CPU of training, evaluating and saving (the lab's ~10 such attempts share the machine with the rest)
LONG = dict(epochs=6)
SLOW_STEP_S = "4"
WAIT_S = 600
# Runs that cannot end before the test has acted on them, however late its thread gets to it (a CI run under load
# started the drivers 100 s after the jobs, behind slower submissions, and both jobs had finished). A tiny epoch has
# 2 stop checks (after its first step, after the epoch but the last), each FGIC_TEST_STEP_SLEEP_S long: the cancelled
# run 2000 s or more at 1 s; the time-limit job's first attempt 11 x 30 = 330 s or more (its restart at full speed),
# where the warning stops it within 100 s of its first epoch (the driver's poll, Slurm's 30-s check, one step).
ENDLESS = dict(epochs=1000)
FIRST_ATTEMPT_STEP_S = 30
TIME_LIMIT_MIN, WARN_S = 15, 300  # the time-limit job's: --time, and --signal=USR2@WARN_S (train.sbatch's own)
SIGNALS = ("term", "usr2")  # the preemptions by signal (scancel --signal=...)
LOADERS = ["--cache", "off", "--workers", "2"]  # loader worker processes, which the signals reach too
WANDB = ["--wandb", "--wandb-project", "fgic-test"]  # offline (the lab's WANDB_MODE): W&B's files in the run folder
WANDB_JOBS = ("gpu2_usr2", "timelimit")  # the requeued jobs that log to W&B too


def cluster_problem() -> str | None:
    if not shutil.which("sbatch"):
        return "no Slurm here (sbatch is not on PATH)"
    up = subprocess.run(["bash", str(REPO / "tests" / "slurm" / "cluster.sh"), "status"], capture_output=True)
    return None if up.returncode == 0 else "the local Slurm cluster is not up"


@dataclass
class Lab:
    root: Path
    alpha: Path
    procs: dict
    env: dict
    jobs: dict = field(default_factory=dict)  # name -> job id of the preempted runs
    drivers: dict = field(default_factory=dict)  # name -> Driver: what a test does to its job while it runs
    duplicate: subprocess.CompletedProcess | None = None  # the cancelled job's command submitted again (sbatch)

    def finish(self, name: str) -> str:
        """Wait for one submitted command; its output."""
        out, _ = self.procs[name].communicate(timeout=WAIT_S)
        return out

    def job_id(self, name: str) -> str:
        """The job id of a submission still waiting for its job: sbatch's or launch.submitit's line saying it."""
        for line in self.procs[name].stdout:
            found = re.search(r"Submitted batch job (\d+)|submitted 1 job\(s\) to slurm: (\S+)", line)
            if found:
                return found.group(1) or found.group(2)
        raise AssertionError(f"{name}: no job was submitted")


class Driver(threading.Thread):
    """Acts on a running job from the background (jobs run while earlier tests wait); keeps its failure for the test."""

    def __init__(self, action, lab: Lab, name: str):
        super().__init__(daemon=True)
        self.action, self.lab, self.name, self.error = action, lab, name, None

    def run(self):
        try:  # the job id read here, not after the submissions before it (sweep.sh, launch.submitit: 100 s under load)
            self.lab.jobs[self.name] = self.lab.job_id(self.name)
            self.action(self.lab, self.name)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test's thread by check())
            self.error = exc

    def check(self):
        self.join(WAIT_S)
        assert not self.is_alive(), f"{self.name}: the driver did not finish"
        if self.error:
            raise self.error


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    problem = cluster_problem()
    if problem:
        message = f"{problem}: start it with `bash tests/slurm/cluster.sh start` (as root; installs Debian's Slurm)"
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the Slurm tests, but {message}")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("slurm")
    wait_for_memory(LAB_GB)  # not beside the arch sweep's largest shards (see wait_for_memory)
    alpha = make_tiny(root / "data" / "alpha", test_counts=(6, 6, 6))
    beta = make_tiny(root / "data" / "beta", test_counts=(6, 6, 6), seed=1)
    garbled = root / "garbled.pt"
    garbled.write_bytes(b"not a torch file")
    job_name = f"fgic-test-{os.getpid()}"
    env = fgic_env(PYTHON=sys.executable, SBATCH_JOB_NAME=job_name, WANDB_MODE="offline", WANDB_SILENT="true",
                   **{f"WANDB_{d}_DIR": str(root / "wandb-home" / d.lower()) for d in ("CONFIG", "CACHE", "DATA")})

    def start(cmd, **extra):
        return subprocess.Popen([str(c) for c in cmd], cwd=root, env={**env, **extra}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    # The preempted jobs: slow steps, and a scontrol that is slow to exit after a requeue, as on a busy node, so
    # that the SIGTERM with which Slurm ends the requeued step always reaches it first (fgic must hold it back).
    # In Python: a shell waiting for its child unblocks SIGTERM (sigsuspend), which scontrol itself does not.
    slow_exit = root / "bin" / "scontrol"
    slow_exit.parent.mkdir()
    # With REQUEUE_TIME_LIMIT it first puts the job's limit back up, from inside the job (the time-limit job's
    # restart must not get a warning of its own, whenever the test's thread runs).
    scontrol = shutil.which("scontrol")
    slow_exit.write_text(f"#!{sys.executable}\nimport os, subprocess, sys, time\n"
                         f"if sys.argv[1:2] == ['requeue'] and os.environ.get('REQUEUE_TIME_LIMIT'):\n"
                         f"    subprocess.run([{scontrol!r}, 'update', 'JobId=' + sys.argv[2],\n"
                         f"                    'TimeLimit=' + os.environ['REQUEUE_TIME_LIMIT']], check=True)\n"
                         f"code = subprocess.call([{scontrol!r}, *sys.argv[1:]])\n"
                         f"if sys.argv[1:2] == ['requeue']:\n    time.sleep(2)\nsys.exit(code)\n")
    slow_exit.chmod(0o755)
    slow = dict(FGIC_TEST_STEP_SLEEP_S=SLOW_STEP_S, PATH=f"{slow_exit.parent}:{env['PATH']}")
    # The time-limit job's interpreter: slow steps in its first attempt, none in its restart.
    first_slow = slow_exit.parent / "python-first-attempt-slow"
    first_slow.write_text(f'#!/bin/sh\nif [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then\n'
                          f'    export FGIC_TEST_STEP_SLEEP_S={FIRST_ATTEMPT_STEP_S}\n'
                          f'else\n    unset FGIC_TEST_STEP_SLEEP_S\nfi\nexec {shlex.quote(sys.executable)} "$@"\n')
    first_slow.chmod(0o755)
    procs = {
        # a swept flag whose second value fails at run time (a missing dataset is refused before sbatch); the runs
        # folder given in FGIC_ARGS
        "sweep": start(["bash", SWEEP, "--wait", *CPU_JOB], DATASETS=f"{alpha} {beta}", SEEDS="0 1",
                       SWEEP=f"weights=none,{garbled}", MAX_PARALLEL="4",
                       FGIC_ARGS=shlex.join([*tiny_args(), "--output-dir", str(root / "sweep")])),
        "train2": start(["sbatch", "--wait", "--gpus-per-node=2", "--cpus-per-task=1", TRAIN, "-d", alpha,
                         *tiny_args(), "--output-dir", root / "train2"]),
        "submitit": start([sys.executable, "-m", "launch.submitit", "--datasets", alpha, "--sweep", "lr=0.1,0.05",
                           "--cluster", "slurm", "--timeout", "10", "--wait", *tiny_args(),
                           "--output-dir", root / "submitit"], PYTHONPATH=str(REPO)),
        # GPU-shaped: 2 processes under torchrun on the 2 (fake) GPUs, or 2 srun tasks; loader workers alive. On 2
        # GPUs, USR2 stops a train.sbatch job and TERM a one-combination sweep.sh job (torchrun's exit code 1 then, not
        # a failure)
        "gpu2_usr2": start(["sbatch", "--wait", "--gpus-per-node=2", "--cpus-per-task=1", TRAIN, "-d", alpha,
                            *tiny_args(**LONG), *LOADERS, *WANDB, "--output-dir", root / "gpu2_usr2"], **slow),
        "gpu2_term": start(["bash", SWEEP, "--wait", "--gpus-per-node=2", "--cpus-per-task=1"], DATASETS=str(alpha),
                           SEEDS="2020", FGIC_ARGS=shlex.join([*tiny_args(**LONG), *LOADERS, "--output-dir",
                                                                str(root / "gpu2_term")]), **slow),
        **{f"srun2_{sig}": start(["sbatch", "--wait", "--ntasks-per-node=2", "--cpus-per-task=1", "--requeue",
                                  "--open-mode=append", "--output=fgic-%j.out", "--wrap", shlex.join(
                                      ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=1", sys.executable, "-m",
                                       "fgic.ddp", "-d", str(alpha), *tiny_args(**LONG), *LOADERS, "--output-dir",
                                       str(root / f"srun2_{sig}")])], **slow)
           for sig in SIGNALS},
        "cancelled": start(["sbatch", "--wait", *CPU_JOB, TRAIN, "-d", alpha, *tiny_args(**ENDLESS),
                            "--output-dir", root / "cancelled"], **{**slow, "FGIC_TEST_STEP_SLEEP_S": "1"}),
        "timelimit": start(["sbatch", "--wait", *CPU_JOB, f"--time={TIME_LIMIT_MIN}", f"--signal=USR2@{WARN_S}", TRAIN,
                            "-d", alpha, *tiny_args(**LONG), *WANDB, "--output-dir", root / "timelimit"],
                           **slow, PYTHON=str(first_slow), REQUEUE_TIME_LIMIT=str(TIME_LIMIT_MIN)),
        "submitit_preempted": start([sys.executable, "-m", "launch.submitit", "--datasets", alpha, "--cluster", "slurm",
                                     "--timeout", "10", "--wait", *tiny_args(**LONG),
                                     "--output-dir", root / "submitit_preempted"], PYTHONPATH=str(REPO), **slow),
        "reference": start([sys.executable, "-m", "fgic.ddp", "-d", alpha, *tiny_args(**LONG),
                            "--output-dir", root / "reference"]),
        "reference2": start(cluster.command(["-d", alpha, *tiny_args(**LONG), "--output-dir", root / "reference2"], 2)),
    }
    lab = Lab(root, alpha, procs, env)
    preempted = [(f"{layout}_{sig}", preempt_by_scancel) for layout in ("gpu2", "srun2") for sig in SIGNALS]
    for name, action in (*preempted, ("timelimit", preempt_by_time_limit), ("submitit_preempted", preempt_by_scancel),
                         ("cancelled", duplicate_then_cancel)):
        lab.drivers[name] = Driver(action, lab, name)
        lab.drivers[name].start()
    yield lab
    subprocess.run(["scancel", f"--name={job_name}"], capture_output=True)
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def test_sweep_runs_every_combination_and_records_the_failed_one(lab):
    out = lab.finish("sweep")
    assert lab.procs["sweep"].returncode != 0, out  # sbatch --wait: some array tasks failed
    runs = lab.root / "sweep"
    for dataset in ("alpha", "beta"):
        for seed in (0, 1):
            summary = json.loads((runs / dataset / f"resnet18-off-s{seed}-weightsnone" / "summary.json").read_text())
            assert summary["epochs"] == 2 and summary["test_total"] == 18
    failed = sorted(p.name for p in (runs / "failed").iterdir())
    assert failed == [f"{d}-resnet18-off-s{s}-weightsgarbled.pt.json" for d in ("alpha", "beta") for s in (0, 1)]
    record = json.loads((runs / "failed" / failed[0]).read_text())
    assert record["exit_code"] == 2 and "garbled.pt: unreadable" in Path(record["log"]).read_text()

    report = subprocess.run([sys.executable, "-m", "fgic.report", str(runs), "--no-plot"], cwd=REPO, env=fgic_env(),
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    table = (runs / "results.md").read_text()
    for dataset in ("alpha", "beta"):
        finals = [json.loads((runs / dataset / f"resnet18-off-s{s}-weightsnone" / "summary.json").read_text())
                  ["final_test_acc"] for s in (0, 1)]
        assert f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f} (2)" in table
    for dataset, seed in itertools.product((lab.alpha, lab.root / "data" / "beta"), (0, 1)):
        assert f"{dataset}, seed {seed}, amp off: exit code 2" in table


def test_train_template_runs_two_processes_on_two_allocated_gpus(lab):
    out = lab.finish("train2")
    assert lab.procs["train2"].returncode == 0, out
    run = lab.root / "train2" / "alpha" / RUN
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["launcher"] == "torchrun"
    assert json.loads((run / "summary.json").read_text())["test_total"] == 18


def test_submitit_sweep(lab):
    out = lab.finish("submitit")
    assert lab.procs["submitit"].returncode == 0, out
    assert out.count(": done") == 2, out
    runs = lab.root / "submitit"
    for lr in ("0.1", "0.05"):
        assert len(read_jsonl(runs / "alpha" / f"resnet18-off-s2020-lr{lr}" / "metrics.jsonl")) == 2
    report = subprocess.run([sys.executable, "-m", "fgic.report", str(runs), "--no-plot"], cwd=REPO, env=fgic_env(),
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    head, _, *rows = [line for line in (runs / "results.md").read_text().splitlines() if line.startswith("| ")][:4]
    assert head.split(" | ")[:3] == ["| arch", "amp", "lr"], head  # the swept flag as a column, a row per value
    assert [row.split(" | ")[2] for row in rows[:2]] == ["0.05", "0.1"], rows


def reference(lab, name: str = "reference") -> Path:
    out = lab.finish(name) if lab.procs[name].returncode is None else ""
    assert lab.procs[name].returncode == 0, out
    return lab.root / name / "alpha" / RUN


def one_wandb_run(run: Path) -> None:
    """The requeued run is one W&B run (offline: one file per attempt), metrics.jsonl's epochs in it once each."""
    optional("wandb")
    from tests import wandb_files
    attempts = wandb_files.attempts(run)
    assert len(attempts) == 2 and attempts[0]["id"] == attempts[1]["id"], attempts
    assert (attempts[0]["preempting"], attempts[0]["exit_code"], attempts[1]["exit_code"]) == (True, 75, 0), attempts
    rows = wandb_files.history(run)[attempts[0]["id"]]
    epochs = list(range(1, LONG["epochs"] + 1))
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == epochs
    assert attempts[1]["summary"]["final_test_acc"] == json.loads((run / "summary.json").read_text())["final_test_acc"]


def wait_for(condition, lab: Lab, name: str, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline and lab.procs[name].poll() is None, f"{name}: {what} did not happen"
        time.sleep(0.5)


def first_epoch_done(lab: Lab, name: str) -> Path:
    metrics = lab.root / name / "alpha" / RUN / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and read_jsonl(metrics), lab, name, "the first epoch")
    return metrics.parent


def preempt_by_scancel(lab: Lab, name: str) -> None:
    """A preemption by signal, as scancel --signal sends it: to every process of the job's steps."""
    first_epoch_done(lab, name)
    sig = name.rpartition("_")[2] if name.endswith(SIGNALS) else "usr2"
    subprocess.run(["scancel", f"--signal={sig.upper()}", lab.jobs[name]], check=True)


def cancel(lab: Lab, name: str) -> None:
    """A plain scancel, early in an epoch's training: the stop then comes within a step, well inside the KillWait
    (15 s here) after which Slurm kills the job (a signal during evaluation waits for the next epoch's first step).
    The run (ENDLESS) cannot end before it."""
    metrics = first_epoch_done(lab, name) / "metrics.jsonl"
    done = len(read_jsonl(metrics))
    wait_for(lambda: len(read_jsonl(metrics)) > done, lab, name, "the end of an epoch")
    time.sleep(0.5)  # past the checkpoint write, into the first step
    subprocess.run(["scancel", lab.jobs[name]], check=True)


def duplicate_then_cancel(lab: Lab, name: str) -> None:
    """The same command submitted again while the job trains (its lock held), then the plain scancel."""
    first_epoch_done(lab, name)
    lab.duplicate = subprocess.run(["sbatch", "--wait", "--parsable", *CPU_JOB, TRAIN, "-d", str(lab.alpha),
                                    *tiny_args(**ENDLESS), "--output-dir", str(lab.root / name)], cwd=lab.root,
                                   env=lab.env, capture_output=True, text=True, timeout=WAIT_S)
    cancel(lab, name)


def preempt_by_time_limit(lab: Lab, name: str) -> None:
    """The job asks for USR2 WARN_S before its limit; once it has trained an epoch, its limit is cut to less than
    WARN_S from now, so the warning comes at Slurm's next check (within 30 s), mid-training: the first attempt cannot
    end sooner (FIRST_ATTEMPT_STEP_S), and it stops within a step, long before the limit. The job itself puts the
    limit back up before it requeues itself (REQUEUE_TIME_LIMIT), so that its restart gets no warning."""
    job = lab.jobs[name]
    first_epoch_done(lab, name)
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    h, m, sec = (int(x) for x in re.search(r"RunTime=(?:\d+-)?(\d+):(\d+):(\d+)", info).groups())
    minutes = h * 60 + m + WARN_S // 60  # whole minutes (Slurm's unit): WARN_S - 60 to WARN_S seconds left
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"], check=True)
    log = lab.root / f"fgic-{job}.out"
    wait_for(lambda: "fgic: stopped by SIGUSR2" in log.read_text(), lab, name, "the time-limit warning")


def test_time_limit_warning_requeues_and_ends_as_an_uninterrupted_run(lab):
    name = "timelimit"
    lab.drivers[name].check()
    out = lab.finish(name)
    log = (lab.root / f"fgic-{lab.jobs[name]}.out").read_text()
    assert lab.procs[name].returncode == 0, f"{out}\n{log}"
    assert "fgic: stopped by SIGUSR2" in log and "requeued Slurm job" in log and "(restart 1)" in log, log
    same_result(lab.root / name / "alpha" / RUN, reference(lab))
    one_wandb_run(lab.root / name / "alpha" / RUN)


@pytest.mark.parametrize("layout", ["gpu2", "srun2"])
@pytest.mark.parametrize("sig", SIGNALS)
def test_two_process_job_preempted_by_a_signal_to_its_whole_step_ends_as_an_uninterrupted_run(lab, layout, sig):
    """slurm/train.sbatch (USR2) or slurm/sweep.sh (TERM) on 2 GPUs (launch.torchrun: 2 processes under torchrun), or
    2 srun tasks of fgic.ddp, with loader workers; `scancel --signal` reaches every process of the step, torchrun and
    the loader workers included. Every rank stops at one step, rank 0 checkpoints and requeues the job (the others
    wait for it: the step's --kill-on-bad-exit or torchrun would end rank 0 as soon as one exits), and the restart
    resumes bitwise."""
    name = f"{layout}_{sig}"
    lab.drivers[name].check()
    out = lab.finish(name)
    swept = name == "gpu2_term"
    log = (lab.root / (f"fgic-sweep-{lab.jobs[name]}_0.out" if swept else f"fgic-{lab.jobs[name]}.out")).read_text()
    assert lab.procs[name].returncode == 0, f"{out}\n{log}"
    if swept:  # no failure record for the stop, though torchrun ended with 1 (before: sweep.sh wrote one)
        assert f"(job {lab.jobs[name]}, restart 1," in log and not (lab.root / name / "failed").exists(), log
    assert f"fgic: stopped by SIG{sig.upper()}" in log and "requeued Slurm job" in log, log
    assert "fgic: resuming" in log and "killed by signal" not in log and "death signal" not in log, log
    config = json.loads((lab.root / name / "alpha" / RUN / "config.json").read_text())
    assert config["world_size"] == 2 and config["launcher"] == ("torchrun" if layout == "gpu2" else "srun")
    same_result(lab.root / name / "alpha" / RUN, reference(lab, "reference2"))
    if name in WANDB_JOBS:
        one_wandb_run(lab.root / name / "alpha" / RUN)


def test_a_cancelled_job_stops_with_its_checkpoint_and_is_not_requeued(lab):
    """A plain scancel ends with SIGTERM too: fgic checkpoints, but the job stays cancelled. Before it, the same
    command submitted again was refused, naming the job that trains the run folder, and changed nothing in it."""
    name = "cancelled"
    lab.drivers[name].check()
    lab.finish(name)
    job = lab.jobs[name]
    run = lab.root / name / "alpha" / RUN
    duplicate = lab.duplicate.stdout.strip().split(";")[0]
    refused = (lab.root / f"fgic-{duplicate}.out").read_text()
    held = rf"error: {re.escape(str(run))} is being trained by pid \d+ on \S+, Slurm job {job}, since "
    assert lab.duplicate.returncode != 0 and re.search(held, refused), f"{lab.duplicate}\n{refused}"
    epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")]
    assert epochs == list(range(1, len(epochs) + 1)), epochs
    log = (lab.root / f"fgic-{job}.out").read_text()
    assert "fgic: stopped by SIGTERM" in log and f"job {job} is COMPLETING, not running" in log, log
    assert "(restart 1)" not in log and "requeued Slurm job" not in log
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) >= (1, 1) and not (run.parent / f".{RUN}.lock").exists()
    states = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True,
                            text=True).stdout.split()
    assert states and states[0].startswith("CANCELLED"), states


def test_submitit_job_preempted_requeues_and_ends_as_an_uninterrupted_run(lab):
    """fgic checkpoints the step on USR2, then hands over to submitit's own handler, which requeues the job."""
    name = "submitit_preempted"
    lab.drivers[name].check()
    out = lab.finish(name)
    logs = lab.root / name / "submitit" / lab.jobs[name]
    err, log = ((logs / f"{lab.jobs[name]}_0_log.{x}").read_text() for x in ("err", "out"))
    why = f"{out}\n--- the job's stdout:\n{log[-4000:]}\n--- its stderr:\n{err[-4000:]}"
    assert lab.procs[name].returncode == 0 and ": done" in out, why
    assert "fgic: stopped by SIGUSR2" in err and "Requeued job" in log and "fgic: resuming" in log + err, err
    same_result(lab.root / name / "alpha" / RUN, reference(lab))
    assert json.loads((lab.root / name / "alpha" / RUN / "config.json").read_text())["launcher"] == "submitit"


STEP_PROBE = """
import os, subprocess, sys
import launch.submitit as launcher


class Probe:  # the job body in place of fgic.ddp: writes what Slurm reports for this task's step
    def __init__(self, argv):
        self.out = argv[argv.index("--output-dir") + 1]

    def __call__(self):
        step = os.environ["SLURM_JOB_ID"] + "." + os.environ["SLURM_STEP_ID"]
        info = subprocess.run(["scontrol", "show", "step", step], capture_output=True, text=True, check=True).stdout
        with open(os.path.join(self.out, "task" + os.environ["SLURM_PROCID"]), "w") as f:
            f.write(info)

launcher.Train = Probe
sys.exit(launcher.main(sys.argv[1:]))
"""


def test_submitit_gives_each_gpu_process_the_nodes_cpus_per_gpu(lab):
    """`launch.submitit --gpus-per-node 2` on this node (8 CPUs, 2 GPUs) with no --cpus-per-task: 2 tasks of 4 CPUs,
    asked of the job and of its srun step. Slurm's view of the step from inside each task: 8 CPUs, cpu:4 per task.
    Measured before: no default gave a 2-CPU job and step (1 per task); the job's default without srun's gave a
    step of 8 CPUs that asked for cpu:2 (1 per task: Slurm 22.05's srun does not take it from the job)."""
    out_dir = lab.root / "cpus"
    out_dir.mkdir()
    run = subprocess.run([sys.executable, "-c", STEP_PROBE, "--datasets", str(lab.alpha), "--cluster", "slurm",
                          "--gpus-per-node", "2", "--timeout", "5", "--wait", *tiny_args(),
                          "--output-dir", str(out_dir)],
                         cwd=lab.root, env=fgic_env(SBATCH_JOB_NAME=f"fgic-test-{os.getpid()}"), capture_output=True,
                         text=True, timeout=WAIT_S)
    assert run.returncode == 0 and ": done" in run.stdout, run.stdout + run.stderr
    assert "2 task(s), 2 GPU(s) per node, --cpus-per-task 4 (4 CPUs per GPU" in run.stdout, run.stdout
    for task in (0, 1):
        step = (out_dir / f"task{task}").read_text()
        assert re.search(r"\bCPUs=8 Tasks=2\b", step) and re.search(r"\bTresPerTask=(.*,)?cpu:4\b", step), step
