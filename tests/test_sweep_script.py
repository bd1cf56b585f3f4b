"""slurm/sweep.sh without a cluster: every combination is checked before sbatch, each array index maps to one
combination (any fgic.ddp flag swept), a wrong array size is an error, and a failed combination leaves its record for
the report (sbatch, srun and scontrol are stand-ins on PATH)."""
import itertools
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

SWEEP = REPO / "slurm" / "sweep.sh"
FAKE_SRUN = """#!/bin/bash
echo "$*" >>"$SRUN_CALLS"
exit "${SRUN_EXIT:-0}"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$3" = 99_0 ] && echo "   StdOut=/logs/sweep.out"\n')
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$*" >>"$SBATCH_CALLS"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def submit(fake_slurm, tmp_path, **env):
    """`bash slurm/sweep.sh` outside a job: it checks the sweep and submits itself (to the stand-in sbatch)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(PATH=f"{fake_slurm}:{os.environ['PATH']}", SRUN_CALLS=str(tmp_path / "calls"),
                SBATCH_CALLS=str(tmp_path / "sbatch"), RUNS=str(tmp_path / "runs"), PYTHON=sys.executable,
                PYTHONPATH=str(REPO), **env)
    return subprocess.run(["bash", str(SWEEP)], env=full, capture_output=True, text=True, cwd=tmp_path)


def run_task(fake_slurm, tmp_path, index, count, **env):
    return submit(fake_slurm, tmp_path, SLURM_JOB_ID="100", SLURM_ARRAY_JOB_ID="99", SLURM_ARRAY_TASK_ID=str(index),
                  SLURM_ARRAY_TASK_COUNT=str(count), SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX=str(count - 1),
                  **env)


@pytest.mark.e2e
def test_every_index_runs_one_combination(fake_slurm, tmp_path):
    env = dict(DATASETS="cub /data/my", SEEDS="0 7", AMPS="off", SWEEP="lr=0.05,0.1", FGIC_ARGS="--epochs 3 --note x")
    for i in range(8):
        assert run_task(fake_slurm, tmp_path, i, 8, **env).returncode == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    seen = set()
    for call in calls:
        words = call.split()
        assert words[:4] == ["--kill-on-bad-exit=1", sys.executable, "-m", "launch.torchrun"]
        assert words[4:8] == ["--epochs", "3", "--note", "x"]
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
@pytest.mark.parametrize("count", [3, 5])
def test_wrong_array_size_is_an_error(fake_slurm, tmp_path, count):
    out = run_task(fake_slurm, tmp_path, 0, count, DATASETS="cub cars", SEEDS="0 1")
    assert out.returncode == 2 and not (tmp_path / "calls").exists()
    assert "the sweep has 4 combinations; submit with sbatch --array=0-3 slurm/sweep.sh" in out.stderr


@pytest.mark.e2e
def test_failure_is_recorded_and_preemption_is_not(fake_slurm, tmp_path):
    env = dict(DATASETS="/nowhere/birds", SEEDS="3", FGIC_ARGS="--epochs 2")
    record = tmp_path / "runs" / "failed" / "birds-resnet50-off-s3.json"
    assert run_task(fake_slurm, tmp_path, 0, 1, SRUN_EXIT="75", **env).returncode == 75
    assert not record.exists()
    assert run_task(fake_slurm, tmp_path, 0, 1, SRUN_EXIT="2", **env).returncode == 2
    assert json.loads(record.read_text()) == {"dataset": "/nowhere/birds", "seed": 3, "amp": "off",
                                              "args": ["--epochs", "2"], "exit_code": 2, "log": "/logs/sweep.out"}
    assert run_task(fake_slurm, tmp_path, 0, 1, **env).returncode == 0
    assert not record.exists()  # a later success clears it


@pytest.mark.e2e
def test_empty_fgic_args_add_no_argument(fake_slurm, tmp_path):
    """No FGIC_ARGS: srun gets exactly the sweep's own flags (no empty "" argument) and the failure record no args."""
    (fake_slurm / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$#" "$@" >"$SRUN_CALLS"\nexit "${SRUN_EXIT:-0}"\n')
    env = dict(DATASETS="/nowhere/birds", SEEDS="3")
    assert run_task(fake_slurm, tmp_path, 0, 1, SRUN_EXIT="2", **env).returncode == 2
    count, *args = (tmp_path / "calls").read_text().splitlines()
    assert args == ["--kill-on-bad-exit=1", sys.executable, "-m", "launch.torchrun", "--output-dir",
                    str(tmp_path / "runs"), "-d", "/nowhere/birds", "--seed", "3", "--amp", "off"]
    assert int(count) == len(args)
    assert json.loads((tmp_path / "runs" / "failed" / "birds-resnet50-off-s3.json").read_text())["args"] == []


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
