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


def test_differences_name_the_options():
    saved = {"arch": "resnet50", "batch_size": 64, "seed": 1, "world_size": 4, "workers": 8}
    now = {"arch": "resnet50", "batch_size": 32, "seed": 1, "world_size": 2, "workers": 2}
    assert checkpoint.differences(saved, now) == ["--batch-size: 64 -> 32"]


def test_select(tmp_path):
    assert checkpoint.select("none", tmp_path) is None
    assert checkpoint.select("auto", tmp_path) is None
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert checkpoint.select("auto", tmp_path) == tmp_path / "checkpoint.pt"
