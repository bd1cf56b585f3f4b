"""fgic on a real one-node Slurm (`bash tests/slurm/cluster.sh start`): the sweep and train templates, the submitit
sweep, preemption by scancel and by the time-limit warning, and a failed combination.

The module submits all its jobs at once so that they overlap; each test then waits for its own. In CI (CI set) a
cluster that is not up fails the tests; elsewhere they skip and say how to start one."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, fgic_env, make_dataset, read_jsonl, same_result, tiny_args

pytestmark = pytest.mark.slurm

TRAIN, SWEEP = str(REPO / "slurm" / "train.sbatch"), str(REPO / "slurm" / "sweep.sh")
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the templates ask for GPUs; these jobs train on the CPU
RUN = "resnet18-off-s2020"  # tiny_args()'s run name
LONG = dict(epochs=8)  # the preempted runs: with FGIC_TEST_STEP_SLEEP_S=2, ~5 s an epoch on any machine
WAIT_S = 600


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

    def finish(self, name: str) -> str:
        """Wait for one submitted command; its output."""
        out, _ = self.procs[name].communicate(timeout=WAIT_S)
        return out

    def job_id(self, name: str) -> str:
        """The job id of an `sbatch --wait` still running (its first line)."""
        line = self.procs[name].stdout.readline()
        return re.search(r"Submitted batch job (\d+)", line).group(1)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    problem = cluster_problem()
    if problem:
        message = f"{problem}: start it with `bash tests/slurm/cluster.sh start` (as root; installs Debian's Slurm)"
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the Slurm tests, but {message}")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("slurm")
    alpha = make_dataset(root / "data" / "alpha", test_counts=(6, 6, 6))
    beta = make_dataset(root / "data" / "beta", test_counts=(6, 6, 6), seed=1)
    name = f"fgic-test-{os.getpid()}"
    env = fgic_env(PYTHON=sys.executable, SBATCH_JOB_NAME=name)

    def start(cmd, **extra):
        return subprocess.Popen([str(c) for c in cmd], cwd=root, env={**env, **extra}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    slow = dict(FGIC_TEST_STEP_SLEEP_S="2")
    procs = {
        "sweep": start(["bash", SWEEP, "--wait", *CPU_JOB], DATASETS=f"{alpha} {beta} {root / 'data' / 'missing'}",
                       SEEDS="0 1", FGIC_ARGS=" ".join(tiny_args()), RUNS=str(root / "sweep")),
        "train2": start(["sbatch", "--wait", "--gpus-per-node=2", "--cpus-per-task=1", TRAIN, "-d", alpha,
                         *tiny_args(), "--output-dir", root / "train2"]),
        "submitit": start([sys.executable, "-m", "launch.submitit", "--datasets", alpha, "--seeds", "0", "1",
                           "--cluster", "slurm", "--timeout", "10", "--wait", *tiny_args(),
                           "--output-dir", root / "submitit"], PYTHONPATH=str(REPO)),
        "scancel": start(["sbatch", "--wait", *CPU_JOB, TRAIN, "-d", alpha, *tiny_args(**LONG),
                          "--output-dir", root / "scancel"], **slow),
        "timelimit": start(["sbatch", "--wait", *CPU_JOB, "--time=2", "--signal=USR2@75", TRAIN, "-d", alpha,
                            *tiny_args(**LONG), "--output-dir", root / "timelimit"], **slow),
        "reference": start([sys.executable, "-m", "fgic.ddp", "-d", alpha, *tiny_args(**LONG),
                            "--output-dir", root / "reference"]),
    }
    yield Lab(root, alpha, procs)
    subprocess.run(["scancel", f"--name={name}"], capture_output=True)
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def test_sweep_runs_every_combination_and_records_the_failed_one(lab):
    out = lab.finish("sweep")
    assert lab.procs["sweep"].returncode != 0, out  # sbatch --wait: some array tasks failed
    runs = lab.root / "sweep"
    for dataset in ("alpha", "beta"):
        for seed in (0, 1):
            summary = json.loads((runs / dataset / f"resnet18-off-s{seed}" / "summary.json").read_text())
            assert summary["epochs"] == 2 and summary["test_total"] == 18
    failed = sorted(p.name for p in (runs / "failed").iterdir())
    assert failed == ["missing-off-s0.json", "missing-off-s1.json"]
    record = json.loads((runs / "failed" / failed[0]).read_text())
    assert record["exit_code"] == 2 and "no such folder" in Path(record["log"]).read_text()


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
    for seed in (0, 1):
        assert len(read_jsonl(lab.root / "submitit" / "alpha" / f"resnet18-off-s{seed}" / "metrics.jsonl")) == 2


def reference(lab) -> Path:
    out = lab.finish("reference") if lab.procs["reference"].returncode is None else ""
    assert lab.procs["reference"].returncode == 0, out
    return lab.root / "reference" / "alpha" / RUN


def test_preempted_by_scancel_requeues_and_ends_as_an_uninterrupted_run(lab):
    job = lab.job_id("scancel")
    metrics = lab.root / "scancel" / "alpha" / RUN / "metrics.jsonl"
    deadline = time.monotonic() + WAIT_S
    while not (metrics.is_file() and read_jsonl(metrics)):  # signal it once an epoch is done
        assert time.monotonic() < deadline and lab.procs["scancel"].poll() is None, "the job did not start training"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    lab.finish("scancel")
    assert lab.procs["scancel"].returncode == 0
    log = (lab.root / f"fgic-{job}.out").read_text()
    assert "fgic: stopped by SIGUSR2" in log and "requeued Slurm job" in log and "(restart 1)" in log, log
    same_result(metrics.parent, reference(lab))


def test_time_limit_warning_requeues_and_ends_as_an_uninterrupted_run(lab):
    job = lab.job_id("timelimit")
    lab.finish("timelimit")
    assert lab.procs["timelimit"].returncode == 0
    log = (lab.root / f"fgic-{job}.out").read_text()
    assert "fgic: stopped by SIGUSR2" in log and "(restart 1)" in log, log
    same_result(lab.root / "timelimit" / "alpha" / RUN, reference(lab))
