"""Tests of fgic.demo: layout, determinism, and ensure_demo's reuse, repair and refusal."""
import hashlib
import os

import pytest
from PIL import Image

from fgic import demo
from fgic.config import DEMO
from fgic.demo import DEMO_CLASSES, MARKER, VERSION, DemoError, ensure_demo

SMALL = {"train": 2, "test": 1}


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return ensure_demo(tmp_path_factory.mktemp("full") / "demo")


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(demo, "SPLITS", SMALL)


def test_layout_and_counts(full):
    assert (full / MARKER).read_text().strip() == VERSION
    assert sorted(p.name for p in full.iterdir()) == sorted([MARKER, "train", "test"])
    assert len(DEMO_CLASSES) == len(set(DEMO_CLASSES)) == demo.NUM_CLASSES
    for split, count in demo.SPLITS.items():
        assert sorted(p.name for p in (full / split).iterdir()) == DEMO_CLASSES  # ImageFolder order = class index
        for name in DEMO_CLASSES:
            assert sorted(p.name for p in (full / split / name).iterdir()) == [f"{i:04d}.jpg" for i in range(count)]
    assert _siblings(full) == ["demo"]  # no temporary folder left behind


def test_images_are_rgb_jpegs_of_the_stated_size(full):
    for path in full.rglob("*.jpg"):
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (demo.IMAGE_SIZE, demo.IMAGE_SIZE))
    with Image.open(full / "train" / DEMO_CLASSES[0] / "0000.jpg") as img:
        img.load()


def test_generation_is_deterministic(full, small, tmp_path):
    a, b = ensure_demo(tmp_path / "a"), ensure_demo(tmp_path / "b")
    ha = _hashes(a)
    assert ha == _hashes(b)
    assert len(ha) == 1 + len(DEMO_CLASSES) * sum(SMALL.values())
    hf = _hashes(full)  # an image depends only on (split, class, index), not on how many were made
    assert all(hf[name] == digest for name, digest in ha.items())


def test_complete_dataset_is_left_alone(full, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in [full, *full.rglob("*")]}
    monkeypatch.setattr(demo, "generate", lambda out: pytest.fail("regenerated a complete dataset"))
    assert ensure_demo(str(full)) == full
    assert {p: p.stat().st_mtime_ns for p in [full, *full.rglob("*")]} == before


def test_interrupted_dataset_is_regenerated(small, tmp_path):
    root = tmp_path / "demo"
    stub = root / "train" / DEMO_CLASSES[3] / "0001.jpg"
    stub.parent.mkdir(parents=True)
    stub.write_bytes(b"half a jpeg")  # no marker: an interrupted generation
    assert ensure_demo(root) == root
    assert (root / MARKER).read_text().strip() == VERSION
    assert _hashes(root) == _hashes(ensure_demo(tmp_path / "fresh"))
    assert _siblings(root) == ["demo", "fresh"]


def test_older_version_is_replaced(small, tmp_path):
    root = ensure_demo(tmp_path / "demo")
    (root / MARKER).write_text("fgic-demo 0\n")
    (root / "train" / "99_old_class").mkdir()
    ensure_demo(root)
    assert (root / MARKER).read_text().strip() == VERSION
    assert not (root / "train" / "99_old_class").exists()


@pytest.mark.parametrize("user_file", ["notes.txt", "train/cat/0000.png", f"test/{DEMO_CLASSES[0]}/mine.jpg"])
def test_unrelated_files_raise_and_are_kept(small, tmp_path, user_file):
    root = tmp_path / "demo"
    (root / user_file).parent.mkdir(parents=True, exist_ok=True)
    (root / user_file).write_text("user data")
    with pytest.raises(DemoError, match="not a demo dataset"):
        ensure_demo(root)
    assert (root / user_file).read_text() == "user data"
    assert _siblings(root) == ["demo"]


def test_a_file_in_the_way_raises(tmp_path):
    (tmp_path / "demo").write_text("user data")
    with pytest.raises(DemoError):
        ensure_demo(tmp_path / "demo")
    assert (tmp_path / "demo").read_text() == "user data"


def test_losing_the_race_uses_the_winners_dataset(small, tmp_path, monkeypatch):
    root = tmp_path / "demo"
    real, winner = demo.generate, {}

    def generate_while_another_process_finishes(out):
        real(out)
        os.makedirs(root)
        real(root)
        (root / MARKER).write_text(VERSION + "\n")
        winner["marker"] = (root / MARKER).stat().st_ino

    monkeypatch.setattr(demo, "generate", generate_while_another_process_finishes)
    assert ensure_demo(root) == root
    assert (root / MARKER).stat().st_ino == winner["marker"]  # the winner's dataset, untouched
    assert _siblings(root) == ["demo"]  # the loser's temporary folder is gone


def test_cli_prints_a_summary(small, tmp_path, capsys):
    assert demo.main([str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert f"{len(DEMO_CLASSES)} classes" in out and f"{2 * len(DEMO_CLASSES)} train" in out and str(tmp_path) in out


@pytest.mark.e2e
def test_demo_command_trains_and_learns(tmp_path):
    """The README's first command, `python -m fgic.ddp -d demo`, end to end (about 1.5 minutes on 2 CPU cores)."""
    import json

    from tests.helpers import run_fgic
    res = run_fgic(["-d", "demo", "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs")])
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "runs" / "demo" / "resnet18-off-s2020" / "summary.json").read_text())
    print(f"demo: final top-1 {summary['final_test_acc']:.1f}% in {summary['wall_seconds']:.0f} s")
    assert summary["test_total"] == 100 and summary["epochs"] == DEMO["epochs"]
    assert summary["final_test_acc"] >= 80  # chance is 10%
