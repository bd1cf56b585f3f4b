"""fgic.bench at tiny sizes: the loader comparison and the training measurement run and report what they say."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fgic import bench
from fgic.errors import FgicError

SMALL = ["--resize", "40", "--crop", "32", "--padding", "4", "-w", "0"]


@pytest.fixture(scope="module")
def jpgs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "jpg"
    assert bench.main(["loader", "--make-data", str(folder), "--images", "20"]) == 0
    return folder


def test_make_data_writes_realistic_jpegs(jpgs):
    train = sorted((jpgs / "train").rglob("*.jpg"))
    assert len(train) == 20 and len(list((jpgs / "test").rglob("*.jpg"))) == 10
    with Image.open(train[0]) as img:
        assert img.size == (500, 375) and img.format == "JPEG"
    assert 10_000 < train[0].stat().st_size < 200_000  # photo-like, not flat colour nor pure noise


def test_loader_compares_the_two_pipelines(jpgs, tmp_path, capsys):
    out = tmp_path / "loader.json"
    bench.main(["loader", "-d", str(jpgs), *SMALL, "-b", "4", "--batches", "6", "--warmup", "1",
                "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["baseline_images_per_second"] > 0 and result["fgic_images_per_second"] > 0
    assert result["ratio"] == pytest.approx(result["fgic_images_per_second"] / result["baseline_images_per_second"])
    text = capsys.readouterr().out
    assert "original: ImageFolder + PIL" in text and f"{result['ratio']:.1f}x" in text and "before timing" in text


@pytest.mark.parametrize("source", [["--synthetic"], ["--pipeline", "fgic"], ["--pipeline", "original"]])
def test_train_measures_each_source(jpgs, tmp_path, capsys, source):
    out = tmp_path / "train.json"
    data = [] if source == ["--synthetic"] else ["-d", str(jpgs)]
    bench.main(["train", *data, *source, *SMALL, "--arch", "resnet18", "-b", "4", "--steps", "2", "--warmup", "1",
                "--amp", "off", "--device", "cpu", "--peak-tflops", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["source"] == ("synthetic" if source == ["--synthetic"] else source[1]) and r["images_per_second"] > 0
    # resnet18: 1.82 G multiply-adds per 224 px image forward, 2 FLOPs each, x3 with the backward; scaled to 32 px
    assert r["step_flops"] == pytest.approx(4 * 3 * 2 * 1.82e9 * (32 / 224) ** 2, rel=0.1)
    assert r["fraction_of_peak"] == pytest.approx(r["achieved_tflops"] / 1) and r["loss_is_finite"]
    assert ("prep_ms_per_batch" in r) == (source == ["--pipeline", "fgic"])
    assert "training (forward + backward + SGD)" in capsys.readouterr().out


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(FgicError, match="-d PATH .* or --synthetic"):
        bench.main(["train"])
    with pytest.raises(FgicError, match="no such folder"):
        bench.main(["loader", "-d", str(tmp_path / "none")])
    with pytest.raises(FgicError, match="--crop 600 is larger"):
        bench.main(["loader", "-d", str(tmp_path), "--crop", "600"])
    if not torch.cuda.is_available():
        with pytest.raises(FgicError, match="--device cuda: no CUDA GPU"):
            bench.main(["train", "--synthetic", "--device", "cuda"])
