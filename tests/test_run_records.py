"""The run's records and stops: the lr recorded after a mid-epoch resume, one line for an error every rank finds,
metrics.jsonl durable before its checkpoint, a full disk during a checkpoint write."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from fgic import checkpoint, cluster, ddp
from fgic.demo import make_tiny
from fgic.errors import FgicError
from fgic.runlog import RunLog
from fgic.signals import EXIT_PREEMPTED, hold
from tests.helpers import REPO, fgic_env, read_jsonl, run_fgic, same_result, tiny_args
from tests.test_resume import ALL_ON, ALL_ON_RUN, args_for


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    """test_resume's: 8 steps per epoch at the global batch of 6."""
    return make_tiny(tmp_path_factory.mktemp("d") / "tiny8", (16, 16, 16), (10, 10, 10))


@pytest.mark.e2e
def test_the_lr_recorded_after_a_resume_at_epoch_1_step_1_is_the_uninterrupted_runs(data8, tmp_path):
    """A USR2 pending when training starts (held back as a launcher holds it) stops the run after epoch 1's first
    step; with the warmup through epoch 1, epoch 2's recorded lr was that of step 7 (the skipped step left out of the
    loader's length), 0.0017637 instead of 0.0023438."""
    args = args_for(data8, tmp_path, extra=ALL_ON)
    run = tmp_path.joinpath(*ALL_ON_RUN)
    proc = subprocess.Popen(cluster.command(args, 1), cwd=REPO, env=fgic_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=hold)
    proc.send_signal(signal.SIGUSR2)  # pending until fgic's handler is in place
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED and "stopped by SIGUSR2 at epoch 1, step 1" in err, err
    res = run_fgic(args)
    assert res.returncode == 0 and "at epoch 1, step 1" in res.stdout, res.stderr
    res = run_fgic(args_for(data8, tmp_path / "ref", extra=ALL_ON))
    assert res.returncode == 0, res.stderr
    ref = tmp_path.joinpath("ref", *ALL_ON_RUN)
    assert [r["lr"] for r in read_jsonl(run / "metrics.jsonl")] == [r["lr"] for r in read_jsonl(ref / "metrics.jsonl")]
    same_result(run, ref)


@pytest.mark.e2e
@pytest.mark.parametrize("flag,message", [
    (("--lr", "-1"), "fgic.ddp: error: --lr -1.0: must be positive"),  # found before the process group exists
    (("--resume", "nowhere.pt"), "fgic.ddp: error: --resume nowhere.pt: no such file"),  # in a set-up step after
], ids=["before-the-group", "set-up-step"])
def test_an_error_every_rank_finds_is_printed_once(data8, tmp_path, flag, message):
    res = run_fgic(["-d", str(data8), *tiny_args(epochs=1, batch_size=6), "--output-dir", str(tmp_path), *flag],
                   nproc=2)
    assert res.returncode != 0 and res.stderr.count("fgic.ddp: error: ") == 1 and message in res.stderr, res.stderr
    assert not re.search(r'File ".*/fgic/', res.stderr), res.stderr


@pytest.mark.e2e  # in-process, but seconds of work (the quick loop stays under a minute)
def test_an_epochs_record_is_on_disk_before_its_checkpoint(tiny_data, tmp_path, monkeypatch):
    """metrics.jsonl and train_log.csv are fsynced before the epoch's checkpoint is renamed into place (before, the
    record sat in the page cache: a node crash could keep the checkpoint and lose the record). In-process, the file
    system calls recorded."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    try:
        assert ddp.main(["-d", str(tiny_data), *tiny_args(epochs=2), "--output-dir", str(tmp_path)]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    saved = [i for i, e in enumerate(events) if e == ("replace", "checkpoint.pt")]
    for name in ("metrics.jsonl", "train_log.csv"):
        synced = [i for i, e in enumerate(events) if e == ("fsync", name)]
        assert len(synced) == len(saved) == 2 and all(s < c for s, c in zip(synced, saved)), (name, events)
        assert saved[0] < synced[1]  # epoch 2's record after epoch 1's checkpoint


def test_a_resume_says_which_records_the_checkpoint_has_but_metrics_jsonl_lost(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 1.0,
                                                       "test_acc": 1.0}) + "\n")
    RunLog(run_dir, True).start({}, 3)
    err = capsys.readouterr().err
    assert f"fgic: warning: {run_dir / 'metrics.jsonl'} lacks the records of epoch(s) 2, 3" in err, err
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 1
    RunLog(run_dir, True).start({}, 1)
    assert capsys.readouterr().err == ""


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_the_old_file_stays(tmp_path, monkeypatch):
    """As torch.save fails on a full file system (measured on a tmpfs): its RuntimeError ("unexpected pos"), the
    OSError ENOSPC its context."""
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"w": torch.ones(4)}, path)
    real_save = torch.save

    def full(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(FgicError) as exc:
        checkpoint.save_atomic({"w": torch.zeros(2**18)}, path)
    assert str(exc.value).startswith(f"{path}: No space left on device; the previous checkpoint.pt is intact; the "
                                     f"write needs about 1 MiB free"), exc.value
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path)["w"], torch.ones(4)) and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of the given size (needs root: mount)."""
    mounted = []

    def make(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}); the in-process ENOSPC test stands")
        mounted.append(where)
        return where
    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.e2e
def test_a_full_disk_at_epoch_2s_checkpoint_stops_every_rank_with_one_line(tiny_data, small_fs):
    """The measured case: on 200 MB, epoch 1's best.pt (45 MB) and checkpoint.pt (90 MB: the weights and SGD's
    momentum) fit, epoch 2's checkpoint (old and new at once) does not. Before: a traceback, exit 1, and the other
    rank waiting at the barrier until torchrun ended it."""
    out = small_fs("200m")
    run = out / "tiny" / "resnet18-off-s2020"
    res = run_fgic(["-d", str(tiny_data), *tiny_args(epochs=3), "--output-dir", str(out)], nproc=2, timeout=300)
    assert res.returncode != 0 and not re.search(r'File ".*/fgic/', res.stderr), res.stderr
    assert (f"fgic.ddp: error: {run / 'checkpoint.pt'}: No space left on device; the previous checkpoint.pt is "
            f"intact; the write needs about 85 MiB free") in res.stderr, res.stderr
    assert "another process failed during the checkpoint writes; rank 0 printed its message" in res.stderr, res.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len(read_jsonl(run / "metrics.jsonl")) == 2  # epoch 2's record: dropped on resume, after the checkpoint


@pytest.mark.e2e
def test_a_run_that_cannot_write_its_first_checkpoint_says_so_before_training(tiny_data, small_fs):
    out = small_fs("30m")
    run = out / "tiny" / "resnet18-off-s2020"
    res = run_fgic(["-d", str(tiny_data), *tiny_args(epochs=3), "--output-dir", str(out)])
    assert res.returncode == 2 and not re.search(r'File ".*/fgic/', res.stderr), res.stderr
    assert (f"fgic.ddp: error: {run / 'checkpoint.pt'}: a trial write before training: No space left on device; no "
            f"checkpoint.pt was written") in res.stderr, res.stderr
    assert "epoch 1/3" not in res.stderr and read_jsonl(run / "metrics.jsonl") == []


def test_engines_metrics_are_named_once_in_the_records_order():
    """ddp.epoch_record names engine's unprefixed metrics (train_, test_, ema_test_) in metrics.jsonl's order; the
    epoch's line and summary.json read the record."""
    train = {"loss": 1.0, "acc": 2.0, "images": 8, "seconds": 3.0, "images_per_second": 4.0}
    test = {"loss": 5.0, "acc": 6.0, "top5": 7.0, "correct": 8, "total": 9, "class_correct": [], "class_total": []}
    record = ddp.epoch_record(2, 0.1, 10.0, train, test, None)
    assert list(record) == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5",
                            "test_correct", "test_total", "epoch_seconds", "train_images_per_second"]
    ema = ddp.epoch_record(2, 0.1, 10.0, train, test, {**test, "acc": 60.0})
    assert list(ema) == [*record, "ema_test_loss", "ema_test_acc", "ema_test_top5", "ema_test_correct"]
    assert (ema["test_acc"], ema["ema_test_acc"], ema["train_images_per_second"]) == (6.0, 60.0, 4.0)
    assert ddp.epoch_line(ema, 3) == ("epoch 2/3  lr 0.1  train loss 1.000 acc 2.00%  |  test loss 5.000 acc 6.00% "
                                      "top5 7.00% (8/9)  |  EMA acc 60.00%  |  10.0 s, 4 img/s")
    progress = checkpoint.Progress(2, best={"acc": 7.0, "epoch": 1}, wall_seconds=12.0,
                                   best_ema={"acc": 60.0, "epoch": 2})
    assert ddp.run_summary(ema, progress, 3, 2) == {
        "final_test_acc": 6.0, "best_test_acc": 7.0, "best_epoch": 1, "epochs": 3, "test_total": 9, "world_size": 2,
        "wall_seconds": 12.0, "ema_final_test_acc": 60.0, "ema_best_test_acc": 60.0, "ema_best_epoch": 2}


@pytest.mark.e2e  # in-process, but seconds of work (the quick loop stays under a minute)
def test_a_run_started_from_resume_path_continues_its_own_checkpoint_and_moves_another_run_aside(tiny_data, tmp_path,
                                                                                               capsys):
    """--resume PATH starts a run from PATH; the same command again (a requeue) continues the run's own checkpoint
    rather than going back to PATH, and an earlier run in the folder is moved aside, not mixed into the new one's
    records."""
    runs = tmp_path / "runs"
    flags = ["-d", str(tiny_data), *tiny_args(epochs=2), "--output-dir", str(runs)]
    try:
        assert ddp.main([*flags, "-n", "a"]) == 0
        mid = torch.load(runs / "tiny" / "resnet18-off-s2020-a" / "checkpoint.pt", weights_only=True)
        torch.save({**mid, "epoch": 1, "step": 0}, tmp_path / "epoch1.pt")  # as if stopped after epoch 1
        assert ddp.main([*flags, "-n", "b", "--resume", str(tmp_path / "epoch1.pt")]) == 0
        b = runs / "tiny" / "resnet18-off-s2020-b"
        records = read_jsonl(b / "metrics.jsonl")
        capsys.readouterr()
        assert ddp.main([*flags, "-n", "b", "--resume", str(tmp_path / "epoch1.pt")]) == 0  # the same command again
        assert "already finished (epoch 2/2)" in capsys.readouterr().out and read_jsonl(b / "metrics.jsonl") == records
        assert ddp.main([*flags, "-n", "c", "--lr", "0.05"]) == 0  # another run in the folder
        c = runs / "tiny" / "resnet18-off-s2020-c"
        earlier = read_jsonl(c / "metrics.jsonl")
        capsys.readouterr()
        with pytest.raises(FgicError, match="made with other options"):
            ddp.main([*flags, "-n", "c", "--lr", "0.05", "--resume", str(tmp_path / "epoch1.pt")])
        assert ddp.main([*flags, "-n", "c", "--resume", str(tmp_path / "epoch1.pt")]) == 0
        out = capsys.readouterr().out
        assert f"fgic: a new run: the earlier run in {c} moved to {c}.old-1" in out
        assert f"fgic: resuming {tmp_path / 'epoch1.pt'} at epoch 2, step 0" in out
        assert read_jsonl(c.with_name(c.name + ".old-1") / "metrics.jsonl") == earlier
        def scores(rows):
            return [(r["epoch"], r["lr"], r["train_loss"], r["test_correct"]) for r in rows]
        assert scores(read_jsonl(c / "metrics.jsonl")) == scores(records)  # epoch 2 from epoch1.pt, as b's: no other
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.e2e  # in-process, but seconds of work
def test_a_resume_onto_other_images_is_refused_and_onto_a_moved_copy_goes_on(tiny_data, tmp_path):
    """A requeue on a node whose copy of -d lacks an image (or --skip-bad-images leaving others out) would continue
    the run on another training set, with its lr schedule shifted; the same files elsewhere are the same data."""
    copy = tmp_path / "a" / "tiny"
    shutil.copytree(tiny_data, copy)
    out = str(tmp_path / "runs")
    try:
        assert ddp.main(["-d", str(copy), *tiny_args(epochs=2), "--output-dir", out]) == 0
        moved = tmp_path / "b" / "tiny"
        moved.parent.mkdir()
        copy.rename(moved)
        (moved / "train" / "class_01" / "003.jpg").unlink()
        with pytest.raises(FgicError, match=r"made with other options \(-d's images: other files \(24 train / 101 "
                                            r"test then, 23 train / 101 test now\)\); --resume none starts over"):
            ddp.main(["-d", str(moved), *tiny_args(epochs=2), "--output-dir", out])
        shutil.copy(tiny_data / "train" / "class_01" / "003.jpg", moved / "train" / "class_01" / "003.jpg")
        assert ddp.main(["-d", str(moved), *tiny_args(epochs=2), "--output-dir", out]) == 0  # moved: the same run
    finally:
        torch.use_deterministic_algorithms(False)
    run = tmp_path / "runs" / "tiny" / "resnet18-off-s2020"
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
