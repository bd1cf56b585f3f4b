import torch

from fgic import checkpoint


def test_save_atomic_round_trip_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    checkpoint.save_atomic({"epoch": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"epoch": 1}, path)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    try:
        checkpoint.save_atomic({"epoch": 2}, path)
    except OSError:
        pass
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_dataset_of_the_same_name_and_class_count_is_another_by_its_classes():
    saved = {"dataset": "tiny", "num_classes": 3, "classes": ["class_00", "class_01", "class_02"]}
    assert checkpoint.differences(saved, {**saved, "classes": ["apple", "class_01", "zebra"]}) == \
        ["-d's classes: 'class_00' -> 'apple'"]
    assert checkpoint.differences(saved, {**saved, "data_path": "/moved/tiny"}) == []  # the data may move
    assert checkpoint.differences({k: v for k, v in saved.items() if k != "classes"}, saved) == []  # an older run


def test_differences_name_the_options():
    saved = {"arch": "resnet50", "batch_size": 64, "seed": 1, "world_size": 4, "workers": 8}
    now = {"arch": "resnet50", "batch_size": 32, "seed": 1, "world_size": 2, "workers": 2}
    assert checkpoint.differences(saved, now) == ["--batch-size: 64 -> 32"]


def test_select(tmp_path):
    assert checkpoint.select("none", tmp_path) is None
    assert checkpoint.select("auto", tmp_path) is None
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert checkpoint.select("auto", tmp_path) == tmp_path / "checkpoint.pt"


def test_the_best_so_far_is_one_rule_for_the_model_and_its_ema():
    """Progress.after_epoch: a strictly higher accuracy makes the epoch the best (a tie keeps the earlier one), the
    model's and the EMA model's alike, and says which best files to write; the epoch's totals and step reset."""
    p = checkpoint.Progress(epoch=0, step=3, totals=[[1.0, 2.0, 3.0]])
    p, bests = p.after_epoch(1, 40.0, 30.0, 5.0)
    assert bests == ["best", "best_ema"] and (p.epoch, p.step, p.totals, p.wall_seconds) == (1, 0, [], 5.0)
    p, bests = p.after_epoch(2, 40.0, 35.0, 9.0)
    assert bests == ["best_ema"] and p.best == {"acc": 40.0, "epoch": 1} and p.best_ema == {"acc": 35.0, "epoch": 2}
    p, bests = p.after_epoch(3, 50.0, None, 12.0)  # no EMA model
    assert bests == ["best"] and p.best == {"acc": 50.0, "epoch": 3} and p.best_ema == {"acc": 35.0, "epoch": 2}
