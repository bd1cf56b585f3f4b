"""Starting over (--resume none): an earlier run is moved aside whole; a requeued Slurm job repeating --resume none
continues the checkpoint it wrote itself (and only that one); the folder check before set-up leaves nothing."""
from __future__ import annotations

import pytest
import torch

from fgic import checkpoint
from fgic.errors import FgicError
from fgic.runlog import RunLog


def write_checkpoint(folder, job):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "epoch": 1, "config": {"slurm_job_id": job}}, folder / "checkpoint.pt")
    return folder / "checkpoint.pt"


@pytest.mark.parametrize("env,resumed", [
    ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, True),  # requeued, its own checkpoint
    ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}, False),  # the job's first start
    ({"SLURM_JOB_ID": "78", "SLURM_RESTART_COUNT": "2"}, False),  # another job's checkpoint
    ({"SLURM_JOB_ID": "77"}, False),  # no restart count
    ({}, False),  # not Slurm
])
def test_resume_none_after_a_requeue_continues_only_the_jobs_own_checkpoint(tmp_path, env, resumed):
    path = write_checkpoint(tmp_path, "77")
    assert checkpoint.select("none", tmp_path, env) == (path if resumed else None)
    assert checkpoint.select("auto", tmp_path, env) == path


def test_a_requeue_without_a_checkpoint_starts_over(tmp_path):
    assert checkpoint.select("none", tmp_path, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}) is None


def test_set_aside_keeps_each_earlier_run(tmp_path):
    run = tmp_path / "runs" / "demo" / "r"
    log = RunLog(run, is_main=True)
    assert log.set_aside() is None  # nothing there
    run.mkdir(parents=True)
    assert log.set_aside() is None and run.is_dir()  # an empty folder is used as it is
    for n in (1, 2):
        (run / "metrics.jsonl").write_text(f"{n}\n")
        assert log.set_aside() == tmp_path / "runs" / "demo" / f"r.old-{n}" and not run.exists()
        run.mkdir()
    assert [(run.parent / f"r.old-{n}" / "metrics.jsonl").read_text() for n in (1, 2)] == ["1\n", "2\n"]
    assert RunLog(run, is_main=False).set_aside() is None


def test_the_folder_check_leaves_nothing_behind(tmp_path):
    (tmp_path / "runs").mkdir()
    RunLog(tmp_path / "runs" / "demo" / "r", is_main=True).make_dir()
    assert list(tmp_path.rglob("*")) == [tmp_path / "runs"]
    (tmp_path / "file").write_text("")
    with pytest.raises(FgicError, match="--output-dir: cannot write the run folder"):
        RunLog(tmp_path / "file" / "demo" / "r", is_main=True).make_dir()
