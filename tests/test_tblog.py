"""--tensorboard: TensorBoard scalars per epoch next to metrics.jsonl, and a notice (no failure) without tensorboard."""
from __future__ import annotations

import sys

import pytest

from fgic.runlog import RunLog, read_records


def record(epoch, acc):
    return {"epoch": epoch, "lr": 0.1 / epoch, "train_loss": 2.0 / epoch, "train_acc": acc - 5, "test_acc": acc,
            "test_loss": 1.0 / epoch, "test_top5": 99.0}


def test_without_tensorboard_a_notice_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now raises ImportError
    log = RunLog(tmp_path, is_main=True, tensorboard=True)
    log.start({"epochs": 2}, 0)
    log.epoch(record(1, 40.0))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tensorboard" in err and "pip install tensorboard" in err
    assert [r["test_acc"] for r in read_records(log.metrics)] == [40.0] and not (tmp_path / "tb").exists()


def test_off_by_default(tmp_path):
    log = RunLog(tmp_path, is_main=True)
    log.start({"epochs": 1}, 0)
    log.epoch(record(1, 40.0))
    assert not (tmp_path / "tb").exists()


def test_scalars_per_epoch_and_no_repeat_after_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, is_main=True, tensorboard=True)
    log.start({"epochs": 3}, 0)
    log.epoch(record(1, 40.0))
    log.epoch(record(2, 50.0))  # written, then killed before the epoch-2 checkpoint: resume redoes epoch 2
    log = RunLog(tmp_path, is_main=True, tensorboard=True)
    log.start({"epochs": 3}, 1)
    log.epoch(record(2, 55.0))
    log.epoch(record(3, 60.0))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "train/acc", "test/loss", "test/acc", "test/top5", "lr"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("test/acc")] == [(1, 40.0), (2, 55.0), (3, 60.0)]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([0.1, 0.05, 0.1 / 3])


def test_an_epoch_1_redone_is_shown_once_with_the_emas_scalars(tmp_path):
    """Killed after epoch 1's record, before its checkpoint: the resume redoes epoch 1 (0 epochs done), whose first
    events are dropped as a later epoch's are; the EMA's test scalars are there too."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def with_ema(epoch, acc):
        return {**record(epoch, acc), "ema_test_acc": acc + 1, "ema_test_loss": 0.5, "ema_test_top5": 99.0}
    log = RunLog(tmp_path, is_main=True, tensorboard=True)
    log.start({"epochs": 2}, 0)
    log.epoch(with_ema(1, 40.0))
    log = RunLog(tmp_path, is_main=True, tensorboard=True)
    log.start({"epochs": 2}, 0)
    log.epoch(with_ema(1, 45.0))
    log.epoch(with_ema(2, 50.0))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("test/acc")] == [(1, 45.0), (2, 50.0)]
    assert [(e.step, e.value) for e in events.Scalars("test_ema/acc")] == [(1, 46.0), (2, 51.0)]
    assert {"test_ema/loss", "test_ema/top5"} <= set(events.Tags()["scalars"])
