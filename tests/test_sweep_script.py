"""slurm/sweep.sh without a cluster: each array index maps to one combination, a wrong array size is an error, and a
failed combination leaves its record for the report (srun and scontrol are stand-ins on PATH)."""
import itertools
import json
import os
import re
import subprocess

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
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def run_task(fake_slurm, tmp_path, index, count, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(PATH=f"{fake_slurm}:{os.environ['PATH']}", SRUN_CALLS=str(tmp_path / "calls"),
                RUNS=str(tmp_path / "runs"), SLURM_JOB_ID="100", SLURM_ARRAY_JOB_ID="99",
                SLURM_ARRAY_TASK_ID=str(index), SLURM_ARRAY_TASK_COUNT=str(count),
                SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX=str(count - 1), **env)
    return subprocess.run(["bash", str(SWEEP)], env=full, capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.e2e
def test_every_index_runs_one_combination(fake_slurm, tmp_path):
    env = dict(DATASETS="cub /data/my cars", SEEDS="0 7", AMPS="off bf16", FGIC_ARGS="--epochs 3 --note x")
    for i in range(12):
        assert run_task(fake_slurm, tmp_path, i, 12, **env).returncode == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    seen = set()
    for call in calls:
        words = call.split()
        assert words[:3] == ["--kill-on-bad-exit=1", "python3", "-m"] and words[3] == "launch.torchrun"
        assert words[-4:] == ["--epochs", "3", "--note", "x"]
        seen.add((words[words.index("-d") + 1], words[words.index("--seed") + 1], words[words.index("--amp") + 1]))
    assert seen == set(itertools.product(["cub", "/data/my", "cars"], ["0", "7"], ["off", "bf16"]))


@pytest.mark.e2e
@pytest.mark.parametrize("count", [3, 5])
def test_wrong_array_size_is_an_error(fake_slurm, tmp_path, count):
    out = run_task(fake_slurm, tmp_path, 0, count, DATASETS="cub cars", SEEDS="0 1")
    assert out.returncode == 2 and not (tmp_path / "calls").exists()
    assert "has 4 combinations; submit with sbatch --array=0-3 slurm/sweep.sh" in out.stderr


@pytest.mark.e2e
def test_failure_is_recorded_and_preemption_is_not(fake_slurm, tmp_path):
    env = dict(DATASETS="/nowhere/birds", SEEDS="3", FGIC_ARGS="--epochs 2")
    record = tmp_path / "runs" / "failed" / "birds-off-s3.json"
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
    assert args == ["--kill-on-bad-exit=1", "python3", "-m", "launch.torchrun", "-d", "/nowhere/birds", "--seed", "3",
                    "--amp", "off", "--output-dir", str(tmp_path / "runs")] and int(count) == len(args)
    assert json.loads((tmp_path / "runs" / "failed" / "birds-off-s3.json").read_text())["args"] == []


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
