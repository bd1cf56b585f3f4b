"""--tensorboard: TensorBoard scalars per epoch next to metrics.jsonl, and a notice (no failure) without tensorboard."""
from __future__ import annotations

import sys

import pytest

from fgic import tblog
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


@pytest.mark.parametrize("done", [1, 0])
def test_scalars_per_epoch_none_repeated_after_a_resume(tmp_path, done):
    """An attempt killed after epoch done+1's record, before its checkpoint: the resume (done epochs done) redoes that
    epoch, and TensorBoard shows each epoch once (done 0: epoch 1, purged as a later epoch is), the EMA's test scalars
    with the model's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scored(epoch, attempt):
        acc = 40.0 + 10 * epoch + attempt
        return {**record(epoch, acc), "ema_test_acc": acc + 1, "ema_test_loss": 0.5, "ema_test_top5": 99.0}
    log = RunLog(tmp_path, is_main=True, tensorboard=True)
    log.start({"epochs": 3}, 0)
    for epoch in range(1, done + 2):
        log.epoch(scored(epoch, 0))
    log = RunLog(tmp_path, is_main=True, tensorboard=True)
    log.start({"epochs": 3}, done)
    for epoch in range(done + 1, 4):
        log.epoch(scored(epoch, 5))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(tblog.SCALARS) == set(events.Tags()["scalars"])
    accs = [scored(e, 0 if e <= done else 5)["test_acc"] for e in (1, 2, 3)]
    assert [(e.step, e.value) for e in events.Scalars("test/acc")] == list(zip((1, 2, 3), accs, strict=True))
    assert [(e.step, e.value) for e in events.Scalars("test_ema/acc")] == [(e, a + 1) for e, a in zip((1, 2, 3), accs)]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([0.1, 0.05, 0.1 / 3])
