"""fgic.bench at tiny sizes: the loader comparison and the training measurement run and report what they say."""
from __future__ import annotations

import argparse
import json
import threading

import pytest
import torch
from PIL import Image
from torch import nn

from fgic import bench, cacheload, drop, models, syncbn
from fgic.errors import FgicError
from tests.helpers import optional

SMALL = ["--resize", "40", "--crop", "32", "--padding", "4", "-w", "0"]


@pytest.fixture(scope="module")
def jpgs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "jpg"
    assert bench.main(["loader", "--make-data", str(folder), "--images", "20"]) == 0
    return folder


@pytest.mark.e2e
def test_make_data_writes_realistic_jpegs(jpgs):
    train = sorted((jpgs / "train").rglob("*.jpg"))
    assert len(train) == 20 and len(list((jpgs / "test").rglob("*.jpg"))) == 10
    with Image.open(train[0]) as img:
        assert img.size == (500, 375) and img.format == "JPEG"
    assert 10_000 < train[0].stat().st_size < 200_000  # photo-like, not flat colour nor pure noise


@pytest.mark.e2e
def test_loader_compares_the_two_pipelines(jpgs, tmp_path, capsys):
    out = tmp_path / "loader.json"
    bench.main(["loader", "-d", str(jpgs), *SMALL, "-b", "4", "--batches", "6", "--warmup", "1",
                "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["baseline_images_per_second"] > 0 and result["fgic_images_per_second"] > 0
    assert result["ratio"] == pytest.approx(result["fgic_images_per_second"] / result["baseline_images_per_second"])
    text = capsys.readouterr().out
    assert "original: ImageFolder + PIL" in text and f"{result['ratio']:.1f}x" in text and "before timing" in text


@pytest.mark.e2e
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


@pytest.mark.e2e  # in-process, but it trains: seconds
def test_train_beside_a_plain_pytorch_step(tmp_path, capsys, monkeypatch):
    """--sync-bn times fgic's BatchNorm with its collectives: every layer gathers over the group of one, in each
    timed step (on a world of one without a named group it would skip them and time plain arithmetic)."""
    gathers = []
    gather = syncbn.all_gather_rows
    monkeypatch.setattr(syncbn, "all_gather_rows", lambda x, group=None: gathers.append(group) or gather(x, group))
    out = tmp_path / "train.json"
    bench.main(["train", "--synthetic", *SMALL, "--arch", "resnet18", "-b", "4", "--steps", "2", "--warmup", "1",
                "--amp", "off", "--device", "cpu", "--reference", "--sync-bn", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["sync_bn"] and not torch.distributed.is_initialized()  # the group of one is gone again
    assert r["synchronised_batchnorms"] == 20  # resnet18's
    assert len(gathers) == 20 * (1 + 2) and all(g is not None for g in gathers)  # the warm-up step, the timed ones
    assert r["reference_images_per_second"] > 0
    assert r["reference_ratio"] == pytest.approx(r["images_per_second"] / r["reference_images_per_second"])
    text = capsys.readouterr().out
    assert "synchronised BatchNorm on a group of one process" in text
    assert "reference: plain PyTorch step" in text and f"ratio fgic / reference: {r['reference_ratio']:.2f}x" in text


@pytest.mark.parametrize("arch", ["resnet18", "timm:resnet18", "timm:efficientnet_b0"])
def test_without_batchnorm_no_norm_is_left_and_the_activations_stay(arch):
    if arch.startswith("timm:"):
        optional("timm")
    model = models.build(arch, 10, "none", crop=32)
    activations = sum(isinstance(m, (nn.ReLU, nn.SiLU)) for m in model.modules())
    out = bench.without_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules())
    assert sum(isinstance(m, (nn.ReLU, nn.SiLU)) for m in out.modules()) == activations  # timm's BatchNormAct2d's act
    assert out(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.e2e  # in-process, but it trains: seconds
def test_compile_compiles_the_reference_in_the_same_mode(tmp_path, monkeypatch):
    """--compile --reference: fgic's step is fgic.ddp's (fgic.compiling: the model with its loss, through inductor in
    --compile-mode) and the plain PyTorch step's model goes through torch.compile in the same mode (the compilers
    stood in for: a CPU compile takes minutes)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None, backend=None: compiled.append(
        (type(m).__name__, mode, backend is not None)) or m)
    monkeypatch.setattr(torch, "_TorchCompileInductorWrapper", lambda mode, *_: compiled.append(("inductor", mode)))
    out = tmp_path / "train.json"
    bench.main(["train", "--synthetic", *SMALL, "--arch", "resnet18", "-b", "4", "--steps", "1", "--warmup", "1",
                "--amp", "off", "--device", "cpu", "--reference", "--compile", "--compile-mode",
                "max-autotune-no-cudagraphs", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["compile"] and r["compile_mode"] == "max-autotune-no-cudagraphs" and r["reference_ratio"] > 0
    assert r["cudagraph_skips"] is None  # counted for reduce-overhead only
    assert compiled == [("inductor", "max-autotune-no-cudagraphs"), ("WithLoss", None, True),
                        ("ResNet", "max-autotune-no-cudagraphs", False)]


@pytest.mark.e2e  # in-process: dynamo traces resnet18 (seconds)
def test_a_failed_compile_gives_no_figure(tmp_path, monkeypatch):
    """fgic.ddp goes on eager when the compile fails; the bench must not report that eager rate as compiled."""
    def inductor(*_):
        def fail(gm, example_inputs):
            raise RuntimeError("no C++ compiler here")
        return fail
    monkeypatch.setattr(torch, "_TorchCompileInductorWrapper", inductor)
    out = tmp_path / "train.json"
    with pytest.raises(FgicError, match=r"--compile: the compile failed \(RuntimeError: no C\+\+ compiler here\); "
                                        r"no compiled figure"):
        bench.main(["train", "--synthetic", *SMALL, "--arch", "resnet18", "-b", "4", "--steps", "1", "--warmup", "1",
                    "--amp", "off", "--device", "cpu", "--compile", "--json", str(out)])
    assert not out.exists()


@pytest.mark.e2e  # in-process, but seconds of work (the quick loop stays under a minute)
@pytest.mark.parametrize("arch", ["resnet50", "convnext_tiny", "efficientnet_v2_s", "vit_b_16"])
def test_a_steps_flops_are_three_forwards(arch):
    """Forward and the two gradients (input, weight) are three passes over the same multiply-adds. torch's own
    counter takes a grouped convolution's weight gradient as ungrouped: 8.7x the forward for convnext_tiny, 14x for
    efficientnet_v2_s."""
    model = models.build(arch, 10, "none", crop=64)
    x, y = torch.zeros(2, 3, 64, 64), torch.zeros(2, dtype=torch.long)
    keys = torch.zeros(2, dtype=torch.int64)
    forward, step = bench.flop_counter(), bench.flop_counter()
    with forward, torch.no_grad(), drop.keyed(model, keys):
        model(x)
    with step, drop.keyed(model, keys):
        nn.functional.cross_entropy(models.logits(model(x)), y).backward()
    assert step.get_total_flops() == pytest.approx(3 * forward.get_total_flops(), rel=0.03)


@pytest.mark.e2e  # in-process, but it trains: seconds
@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None)])
def test_the_peak_is_the_cards_own(name, peak):
    assert bench.peak_of(name)[0] == peak


def test_train_times_a_recipe_step(tmp_path, capsys):
    """--recipe: fgic.ddp's Optimization (AdamW, layer decay, clipping, EMA) steps on a mixed synthetic batch."""
    out = tmp_path / "train.json"
    bench.main(["train", "--synthetic", *SMALL, "--arch", "resnet18", "-b", "4", "--steps", "2", "--warmup", "1",
                "--amp", "off", "--device", "cpu", "--recipe", "transformer", "--json", str(out)])
    r = json.loads(out.read_text())
    assert (r["recipe"], r["step"], r["loss_is_finite"]) == \
        ("transformer", "AdamW + layer decay + clipping + EMA", True)
    text = capsys.readouterr().out
    assert "mixed with itself rolled by one" in text and "training (forward + backward + AdamW + layer" in text
    with pytest.raises(FgicError, match="--pipeline original --recipe tv-v2: .* use --pipeline fgic"):
        bench.main(["train", "-d", str(tmp_path), "--pipeline", "original", "--recipe", "tv-v2", *SMALL])


@pytest.mark.e2e
def test_loader_and_train_with_a_recipes_policies(jpgs, tmp_path, capsys):
    """--recipe tv-v2 on real images: TrivialAugment, erasing and the mixing partners made in the loader."""
    bench.main(["loader", "-d", str(jpgs), *SMALL, "-b", "4", "--batches", "3", "--warmup", "1", "--recipe", "tv-v2"])
    assert "--recipe tv-v2's per-image policies and partners in the workers" in capsys.readouterr().out
    out = tmp_path / "train.json"
    bench.main(["train", "-d", str(jpgs), *SMALL, "--arch", "resnet18", "-b", "4", "--steps", "2", "--warmup", "1",
                "--amp", "off", "--device", "cpu", "--recipe", "tv-v2", "--json", str(out)])
    r = json.loads(out.read_text())
    assert (r["step"], r["loss_is_finite"], "prep_ms_per_batch" in r) == ("SGD + EMA", True, False)


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(FgicError, match="-d PATH .* or --synthetic"):
        bench.main(["train"])
    with pytest.raises(FgicError, match="no such folder"):
        bench.main(["loader", "-d", str(tmp_path / "none")])
    with pytest.raises(FgicError, match="--crop 600 is larger"):
        bench.main(["loader", "-d", str(tmp_path), "--crop", "600"])
    with pytest.raises(FgicError, match="--sync-bn --no-batchnorm: there is no BatchNorm left"):
        bench.main(["train", "--synthetic", "--sync-bn", "--no-batchnorm"])
    with pytest.raises(FgicError, match="--warmup 0: train needs at least 1 warm-up step"):
        bench.main(["train", "--synthetic", "--warmup", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(FgicError, match="--device cuda: no CUDA GPU"):
            bench.main(["train", "--synthetic", "--device", "cuda"])


@pytest.mark.e2e
def test_cached_batches_chain_epochs_from_one_producer(jpgs, monkeypatch):
    """epochs() gives epoch 0's batches, then epoch 1's, ..., exactly as set_epoch + iter does, from one producer
    thread, and leaves the sampler as it was."""
    flags = argparse.Namespace(recipe="seed", batch_size=4, resize=40, crop=32, padding=4, workers=0, cache_dir=None)
    loader = bench.fgic_loader(flags, jpgs, False)  # 20 images: 5 batches of 4 an epoch
    expected = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        expected += [b._replace(images=b.images.clone()) for b in loader]  # a ring buffer: valid until the next
    assert len(expected) == 15
    producers = []
    real = cacheload.CachedBatches._produce
    monkeypatch.setattr(cacheload.CachedBatches, "_produce",
                        lambda self, *a: producers.append(threading.current_thread().name) or real(self, *a))
    loader.sampler.set_epoch(7, skip=4)
    batches = loader.epochs(0)
    chained = [(b := next(batches))._replace(images=b.images.clone()) for _ in range(16)]
    batches.close()
    assert producers == ["fgic-cache-batches"]
    assert all(a is b is None or torch.equal(a, b) for got, want in zip(chained, expected, strict=False)
               for a, b in zip(got, want))
    assert [int(b.params.sum()) for b in chained[:5]] != [int(b.params.sum()) for b in chained[5:10]]  # new draws
    assert (loader.sampler.epoch, loader.sampler.skip) == (7, 4)
    assert not any(t.name == "fgic-cache-batches" for t in threading.enumerate())  # close() stopped it


@pytest.mark.e2e
def test_train_keeps_one_producer_across_epochs(jpgs, tmp_path, monkeypatch):
    """1 warm-up and 12 timed steps of 5 per epoch span 3 epochs: one producer feeds them all (a new one per
    epoch would time a cold first batch at each boundary)."""
    producers = []
    real = cacheload.CachedBatches._produce
    monkeypatch.setattr(cacheload.CachedBatches, "_produce",
                        lambda self, *a: producers.append(threading.current_thread().name) or real(self, *a))
    monkeypatch.setattr(bench, "prep_cost", lambda *a: {})  # its own 3-batch pass reads the loader afresh
    out = tmp_path / "train.json"
    bench.main(["train", "-d", str(jpgs), *SMALL, "--arch", "resnet18", "-b", "4", "--steps", "12", "--warmup", "1",
                "--amp", "off", "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text())["steps_timed"] == 12
    assert producers == ["fgic-cache-batches"]
