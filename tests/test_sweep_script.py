"""slurm/sweep.sh and slurm/train.sbatch without a cluster: every combination is checked before sbatch, each array
index maps to one combination (any fgic.ddp flag swept), a wrong array size is an error, a failed combination leaves
its record for the report and a stopped one does not, srun is the batch step itself, and the scripts find fgic's
interpreter or say in one line how to set it. sbatch, srun and scontrol are stand-ins on PATH; the training is a
stand-in launch.torchrun in the job's folder, which `python -m` finds first."""
import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

SWEEP = REPO / "slurm" / "sweep.sh"
TRAIN = REPO / "slurm" / "train.sbatch"
# srun: its pid (exec: the batch script's own) and its arguments, then the command as one task of a step
FAKE_SRUN = """#!/bin/bash
echo "$$" >"$SRUN_PID"
printf "%s\\n" "$#" "$@" >>"$SRUN_CALLS"
[ "$1" = --kill-on-bad-exit=1 ] || exit 99
shift
SLURM_STEP_ID=0 SLURM_PROCID=0 exec "$@"
"""
# scontrol show job: the job's state (JOB_STATE, RUNNING unless set) and log
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2 $3" = "show job 99_0" ] || exit 1
echo "   JobState=${JOB_STATE:-RUNNING} Reason=None Dependency=(null)"
echo "   Requeue=1 Restarts=0 BatchFlag=1"
echo "   StdOut=/logs/sweep.out"
"""
FAKE_SBATCH = """#!/bin/bash
echo "$*" >>"$SBATCH_CALLS"
echo "$PYTHON" >"$SBATCH_CALLS.python"
"""
# launch.torchrun: records its argv and ends with TRAIN_EXIT
FAKE_TRAINING = """import json, os, sys
with open(os.environ["TRAIN_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(int(os.environ.get("TRAIN_EXIT", "0")))
"""
NO_TORCH = "sweep.sh: error: {} cannot import torch; set PYTHON to the python of fgic's environment, " \
           "e.g. PYTHON=/path/to/fgic/.venv/bin/python"


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "__init__.py").write_text("")
    (tmp_path / "launch" / "torchrun.py").write_text(FAKE_TRAINING)
    return bin_dir


def script(fake_slurm, tmp_path, path=SWEEP, args=(), **env):
    """`bash SCRIPT ARGS` in tmp_path, with the stand-ins; an env value None leaves the variable out. The result has
    the script's pid (srun's, when it execs srun)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("PYTHON", "RUNS")}
    full.update(PATH=f"{fake_slurm}:{os.environ['PATH']}", SRUN_CALLS=str(tmp_path / "calls"),
                SRUN_PID=str(tmp_path / "srun.pid"), TRAIN_CALLS=str(tmp_path / "trained"),
                SBATCH_CALLS=str(tmp_path / "sbatch"), RUNS=str(tmp_path / "runs"), PYTHON=sys.executable,
                PYTHONPATH=str(REPO))
    full.update(env)
    full = {k: v for k, v in full.items() if v is not None}
    proc = subprocess.Popen(["bash", str(path), *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    done.pid = proc.pid
    return done


def submit(fake_slurm, tmp_path, **env):
    """`bash slurm/sweep.sh` outside a job: it checks the sweep and submits itself (to the stand-in sbatch)."""
    return script(fake_slurm, tmp_path, **env)


def run_task(fake_slurm, tmp_path, index, count, **env):
    return submit(fake_slurm, tmp_path, SLURM_JOB_ID="100", SLURM_ARRAY_JOB_ID="99", SLURM_ARRAY_TASK_ID=str(index),
                  SLURM_ARRAY_TASK_COUNT=str(count), SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX=str(count - 1),
                  **env)


def srun_calls(tmp_path) -> list[list[str]]:
    """srun's argument lists, as the stand-in wrote them (the count, then one argument a line)."""
    lines, calls = (tmp_path / "calls").read_text().splitlines(), []
    while lines:
        n, lines = int(lines[0]), lines[1:]
        calls.append(lines[:n])
        lines = lines[n:]
    return calls


def trained(tmp_path) -> list[list[str]]:
    """launch.torchrun's argv, one list per training."""
    path = tmp_path / "trained"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.e2e
def test_every_index_runs_one_combination(fake_slurm, tmp_path):
    env = dict(DATASETS="cub /data/my", SEEDS="0 7", AMPS="off", SWEEP="lr=0.05,0.1", FGIC_ARGS="--epochs 3 --note x")
    for i in range(8):
        out = run_task(fake_slurm, tmp_path, i, 8, **env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"fgic sweep: task {i} of 8: --epochs 3 --note x --output-dir ")
    for call in srun_calls(tmp_path):
        assert call[:6] == ["--kill-on-bad-exit=1", sys.executable, "-m", "fgic.sweep", "run", "--no-check"]
    seen = set()
    for words in trained(tmp_path):
        assert words[:4] == ["--epochs", "3", "--note", "x"]
        lr = words[words.index("--lr") + 1]
        assert words[-2:] == ["-n", f"x-lr{lr}"]  # the note names the swept value: one run folder per lr
        seen.add((words[words.index("-d") + 1], words[words.index("--seed") + 1], words[words.index("--amp") + 1], lr))
    assert seen == set(itertools.product(["cub", "/data/my"], ["0", "7"], ["off"], ["0.05", "0.1"]))


@pytest.mark.e2e
def test_every_combination_is_checked_before_sbatch(fake_slurm, tmp_path, tiny_data):
    bad = submit(fake_slurm, tmp_path, DATASETS=str(tiny_data), SEEDS="0", SWEEP="lr=0.1,fast")
    assert bad.returncode == 2 and not (tmp_path / "sbatch").exists()
    assert bad.stderr.splitlines() == [f"fgic.sweep: error: -d {tiny_data} --seed 0 --amp off --sweep lr=fast: "
                                       f"argument --lr: invalid float value: 'fast'"]
    gone = submit(fake_slurm, tmp_path, DATASETS=f"{tiny_data} /nowhere/birds", SEEDS="0")
    assert gone.returncode == 2 and "-d /nowhere/birds: no such folder" in gone.stderr
    env = dict(DATASETS=str(tiny_data), SEEDS="0 1", SWEEP="arch=resnet18,vit_b_32 compile=on,off", MAX_PARALLEL="3",
               FGIC_ARGS="--crop 64 --resize 72")
    dry = submit(fake_slurm, tmp_path, DRY_RUN="1", **env)
    assert dry.returncode == 0 and not (tmp_path / "sbatch").exists(), dry.stderr
    lines = dry.stdout.splitlines()
    assert len(lines) == 9 and lines[-1] == f"8 combination(s): sbatch --array=0-7%3 {SWEEP}"
    assert lines[0].endswith(f"->  {tmp_path / 'runs'}/tiny/resnet18-off-s0-compile")
    assert lines[1].endswith(f"->  {tmp_path / 'runs'}/tiny/resnet18-off-s0")  # nothing new swept: the name as before
    out = submit(fake_slurm, tmp_path, **env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "sbatch").read_text() == f"--array=0-7%3 {SWEEP}\n"


@pytest.mark.e2e
def test_output_dir_in_fgic_args_is_the_runs_folder(fake_slurm, tmp_path, tiny_data):
    """FGIC_ARGS' --output-dir (any spelling fgic.ddp takes) holds the runs and the failure records; RUNS naming
    another folder is refused before anything is submitted. Before: RUNS's default came after it and won."""
    scratch = tmp_path / "scratch"
    for given in (f"--output-dir {scratch}", f"--output-dir={scratch}", f"--output {scratch}"):
        env = dict(DATASETS=str(tiny_data), SEEDS="3", FGIC_ARGS=f"--epochs 2 {given}", RUNS=None)
        dry = submit(fake_slurm, tmp_path, DRY_RUN="1", **env)
        assert dry.returncode == 0, dry.stderr
        line = dry.stdout.splitlines()[0]
        assert line.count("--output") == 1 and line.endswith(f"->  {scratch}/tiny/resnet50-off-s3"), line
    assert run_task(fake_slurm, tmp_path, 0, 1, TRAIN_EXIT="2", **env).returncode == 2
    assert (scratch / "failed" / "tiny-resnet50-off-s3.json").is_file() and not (tmp_path / "runs").exists()
    both = submit(fake_slurm, tmp_path, **{**env, "RUNS": str(tmp_path / "runs")})
    assert both.returncode == 2 and not (tmp_path / "sbatch").exists()
    assert both.stderr.splitlines() == [f"fgic.sweep: error: --output-dir {scratch} (in FGIC_ARGS) and --runs "
                                        f"{tmp_path / 'runs'} (RUNS) name two runs folders; give one of them"]
    same = submit(fake_slurm, tmp_path, **{**env, "RUNS": str(scratch)})
    assert same.returncode == 0 and (tmp_path / "sbatch").is_file(), same.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("count", [3, 5])
def test_wrong_array_size_is_an_error(fake_slurm, tmp_path, count):
    out = run_task(fake_slurm, tmp_path, 0, count, DATASETS="cub cars", SEEDS="0 1")
    assert out.returncode == 2 and not trained(tmp_path)
    assert "the sweep has 4 combinations; submit with sbatch --array=0-3 slurm/sweep.sh" in out.stderr


@pytest.mark.e2e
def test_failure_is_recorded_and_a_stop_is_not(fake_slurm, tmp_path):
    """A stop is exit 75 from one process, but 1 from torchrun over several: that one is told from a failure by the
    job's state, which a requeue (or a cancel) makes COMPLETING. srun is the batch script's own process (exec), so a
    SIGTERM to the batch step cannot end it before the training has stopped. Before: srun ran as bash's child and
    torchrun's 1 after a requeue left a failure record."""
    env = dict(DATASETS="/nowhere/birds", SEEDS="3", FGIC_ARGS="--epochs 2")
    record = tmp_path / "runs" / "failed" / "birds-resnet50-off-s3.json"
    out = run_task(fake_slurm, tmp_path, 0, 1, TRAIN_EXIT="75", **env)
    assert out.returncode == 75 and not record.exists()
    assert int((tmp_path / "srun.pid").read_text()) == out.pid
    out = run_task(fake_slurm, tmp_path, 0, 1, TRAIN_EXIT="1", JOB_STATE="COMPLETING", **env)
    assert out.returncode == 1 and not record.exists()
    assert "fgic.sweep: exit code 1 while Slurm ends job 99_0 (COMPLETING: requeued or cancelled)" in out.stderr
    assert run_task(fake_slurm, tmp_path, 0, 1, TRAIN_EXIT="2", **env).returncode == 2
    assert json.loads(record.read_text()) == {"dataset": "/nowhere/birds", "seed": 3, "amp": "off",
                                              "args": ["--epochs", "2"], "exit_code": 2, "log": "/logs/sweep.out"}
    assert run_task(fake_slurm, tmp_path, 0, 1, TRAIN_EXIT="1", **env).returncode == 1  # torchrun's 1, running: failed
    assert json.loads(record.read_text())["exit_code"] == 1
    assert run_task(fake_slurm, tmp_path, 0, 1, **env).returncode == 0
    assert not record.exists()  # a later success clears it
    assert len(trained(tmp_path)) == 5


@pytest.mark.e2e
def test_empty_fgic_args_add_no_argument(fake_slurm, tmp_path):
    """No FGIC_ARGS: the training gets exactly the sweep's own flags (no empty "" argument), the failure record no
    args."""
    env = dict(DATASETS="/nowhere/birds", SEEDS="3")
    assert run_task(fake_slurm, tmp_path, 0, 1, TRAIN_EXIT="2", **env).returncode == 2
    assert srun_calls(tmp_path) == [["--kill-on-bad-exit=1", sys.executable, "-m", "fgic.sweep", "run", "--no-check",
                                     "--datasets", "/nowhere/birds", "--seeds", "3", "--amps", "off",
                                     "--runs", str(tmp_path / "runs"), "--"]]
    assert trained(tmp_path) == [["--output-dir", str(tmp_path / "runs"), "-d", "/nowhere/birds", "--seed", "3",
                                  "--amp", "off"]]
    assert json.loads((tmp_path / "runs" / "failed" / "birds-resnet50-off-s3.json").read_text())["args"] == []


def checkout(tmp_path, venv: bool):
    """A copy of the scripts in a checkout of its own (the repository's may have a .venv), with or without a
    .venv/bin/python; and a python3 on PATH that cannot import torch (no site-packages)."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "slurm", root / "slurm")
    if venv:
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        (root / ".venv" / "bin" / "python").chmod(0o755)
    bare = tmp_path / "bare"
    bare.mkdir(exist_ok=True)
    (bare / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    (bare / "python3").chmod(0o755)
    return root, bare


@pytest.mark.e2e
def test_sweep_finds_the_checkouts_venv_or_says_how_to_set_python(fake_slurm, tmp_path, tiny_data):
    """PYTHON unset: the checkout's .venv/bin/python, passed on to the jobs (PYTHON in sbatch's environment), and in
    a job submitted with sbatch the submit folder's; else python3, and one line when it has no torch. Before: python3
    from PATH, and a ModuleNotFoundError traceback."""
    root, bare = checkout(tmp_path, venv=False)
    path = f"{fake_slurm}:{bare}:{os.environ['PATH']}"
    out = script(fake_slurm, tmp_path, root / "slurm" / "sweep.sh", PYTHON=None, PATH=path, DATASETS=str(tiny_data),
                 SEEDS="0")
    assert out.returncode == 2 and not (tmp_path / "sbatch").exists()
    assert out.stderr.splitlines() == [NO_TORCH.format(bare / "python3")]
    root, _ = checkout(tmp_path / "with", venv=True)
    venv_python = str(root / ".venv" / "bin" / "python")
    out = script(fake_slurm, tmp_path, root / "slurm" / "sweep.sh", PYTHON=None, PATH=path, DATASETS=str(tiny_data),
                 SEEDS="0")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "sbatch.python").read_text().strip() == venv_python
    spool = tmp_path / "spool"  # in a job, the script is Slurm's copy
    spool.mkdir()
    shutil.copy(root / "slurm" / "sweep.sh", spool / "slurm_script")
    out = run_task(fake_slurm, tmp_path, 0, 1, path=spool / "slurm_script", PYTHON=None, PATH=path,
                   SLURM_SUBMIT_DIR=str(root), DATASETS="/data/birds", SEEDS="0")
    assert out.returncode == 0, out.stderr
    assert srun_calls(tmp_path)[0][1] == venv_python


def test_train_template_outside_slurm_says_to_submit_it(fake_slurm, tmp_path):
    out = script(fake_slurm, tmp_path, TRAIN, ["-d", "cub"])
    assert out.returncode == 2 and not (tmp_path / "calls").exists()
    assert out.stderr.splitlines() == ["train.sbatch: error: not in a Slurm job; submit it: sbatch slurm/train.sbatch "
                                       "-d cub (fgic.ddp's flags), or train here with python -m fgic.ddp -d cub"]


def test_train_template_finds_the_submit_folders_venv_or_says_how_to_set_python(fake_slurm, tmp_path):
    job = dict(SLURM_JOB_ID="100", SLURM_JOB_NODELIST="n1", PYTHON=None)
    root, bare = checkout(tmp_path, venv=False)
    path = f"{fake_slurm}:{bare}:{os.environ['PATH']}"
    out = script(fake_slurm, tmp_path, TRAIN, ["-d", "cub"], PATH=path, SLURM_SUBMIT_DIR=str(root), **job)
    assert out.returncode == 2 and not (tmp_path / "calls").exists()
    assert out.stderr.splitlines() == [NO_TORCH.format(bare / "python3").replace("sweep.sh", "train.sbatch")
                                       + " sbatch slurm/train.sbatch ..."]
    root, _ = checkout(tmp_path / "with", venv=True)
    out = script(fake_slurm, tmp_path, TRAIN, ["-d", "cub", "--epochs", "2"], PATH=path, SLURM_SUBMIT_DIR=str(root),
                 TRAIN_EXIT="75", **job)
    assert out.returncode == 75, out.stderr
    assert srun_calls(tmp_path) == [["--kill-on-bad-exit=1", str(root / ".venv" / "bin" / "python"), "-m",
                                     "launch.torchrun", "-d", "cub", "--epochs", "2"]]
    assert int((tmp_path / "srun.pid").read_text()) == out.pid
    assert trained(tmp_path) == [["-d", "cub", "--epochs", "2"]]


# Under `set -u`, bash before 4.4 (RHEL/CentOS 7 has 4.2) stops with "unbound variable" at "${a[@]}" or ${a[*]} of
# an array with no elements (bash's CHANGES, 4.4-rc2: "Using ${a[@]} or ${a[*]} with an array without any assigned
# elements when the nounset option is enabled no longer throws an unbound variable error"); ${a[@]+"${a[@]}"}
# expands to nothing there instead. No bash 4.2/4.3 can be had here and BASH_COMPAT=42 does not bring the error
# back, so this reads the scripts rather than running them: what it shows is that no such expansion is left.
ARRAY_WORD = re.compile(r'\$\{(\w+)\[[@*]\]')
GUARDED = re.compile(r'\$\{(\w+)\[([@*])\]\+"\$\{\1\[\2\]\}"\}')


@pytest.mark.parametrize("script", ["sweep.sh", "train.sbatch"])
def test_no_array_expansion_that_bash_before_4_4_rejects_when_empty(script):
    text = (REPO / "slurm" / script).read_text()
    bare = [m.group(0) + "}" for m in ARRAY_WORD.finditer(GUARDED.sub("", text))]
    assert not bare, f"slurm/{script}: under set -u, bash 4.2/4.3 fail on these when the array is empty: {bare}"
