"""slurm/sweep.sh without a cluster: each array index maps to one combination, a wrong array size is an error, and a
failed combination leaves its record for the report (srun and scontrol are stand-ins on PATH)."""
import itertools
import json
import os
import subprocess

import pytest

from tests.conftest import REPO

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
    full.update(PATH=f"{fake_slurm}:{os.environ['PATH']}", SRUN_CALLS=str(tmp_path / "calls"), RUNS=str(tmp_path / "runs"),
                SLURM_JOB_ID="100", SLURM_ARRAY_JOB_ID="99", SLURM_ARRAY_TASK_ID=str(index), SLURM_ARRAY_TASK_COUNT=str(count),
                SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX=str(count - 1), **env)
    return subprocess.run(["bash", str(SWEEP)], env=full, capture_output=True, text=True, cwd=tmp_path)


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


@pytest.mark.parametrize("count", [3, 5])
def test_wrong_array_size_is_an_error(fake_slurm, tmp_path, count):
    out = run_task(fake_slurm, tmp_path, 0, count, DATASETS="cub cars", SEEDS="0 1")
    assert out.returncode == 2 and not (tmp_path / "calls").exists()
    assert "has 4 combinations; submit with sbatch --array=0-3 slurm/sweep.sh" in out.stderr


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
