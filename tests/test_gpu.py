"""CUDA-only paths (NCCL, torch's SyncBatchNorm, CUDA AMP, batches cropped on the GPU, no host sync per step):
`pytest -m gpu` on a GPU machine; skipped without CUDA."""
import argparse
import json
import warnings

import pytest
import torch

from fgic import augment, bench, data, engine, models
from fgic.dist import Dist, Launch
from tests.conftest import read_jsonl, run_fgic, tiny_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_args(epochs=1, workers=2):
    return tiny_args(epochs=epochs, device="cuda", workers=workers)


def test_sync_batchnorm_on_cuda_is_torchs():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    assert isinstance(models.sync_batchnorm(model, torch.device("cuda"), True)[1], torch.nn.SyncBatchNorm)
    assert type(models.sync_batchnorm(model, torch.device("cuda"), False, True)[1]) is torch.nn.BatchNorm2d


def test_batched_gpu_crop_equals_the_cpu_crops():
    images = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8)
    params = torch.tensor([augment.sample_params(1, 0, i, 40, 36, 4) for i in range(16)], dtype=torch.int16)
    on_gpu = augment.crop_flip_batch(images.cuda(), params.cuda(), 36, 4)
    assert on_gpu.is_cuda and on_gpu.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(on_gpu.cpu(), augment.crop_flip_batch(images, params, 36, 4))


def _loaders(root, cache):
    args = argparse.Namespace(resize=72, crop=64, padding=4, seed=5, check_images="fast", skip_bad_images=False,
                              workers=2, batch_size=6, cache=cache, cache_dir=None)
    return data.build(args, root, 1, 0, pin_memory=True)


def test_cached_and_uncached_gpu_batches_are_equal(tiny_data):
    cuda = torch.device("cuda")
    (_, _, cached, cached_test), (_, _, plain, plain_test) = _loaders(tiny_data, "on"), _loaders(tiny_data, "off")
    for epoch in (0, 1):
        cached.sampler.set_epoch(epoch)
        plain.sampler.set_epoch(epoch)
        pairs = list(zip(engine.DeviceBatches(cached, cuda), engine.DeviceBatches(plain, cuda), strict=True))
        assert len(pairs) == 4
        for (x, y), (x2, y2) in pairs:
            assert x.is_cuda and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x, x2) and torch.equal(y, y2)
    tests = zip(engine.DeviceBatches(cached_test, cuda), engine.DeviceBatches(plain_test, cuda), strict=True)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in tests)


@pytest.mark.parametrize("cache", ["on", "off"])
def test_no_host_sync_per_training_step(tiny_data, cache):
    """The step, the device batches and the running totals never wait for the GPU: the synchronisations torch
    reports are the same for 2 steps as for 4 (the epoch's start and end read the totals once)."""
    cuda = torch.device("cuda")
    _, _, loader, _ = _loaders(tiny_data, cache)
    model = models.build("resnet18", 3, "none").to(cuda).to(memory_format=torch.channels_last)
    opt = engine.sgd(model, cuda, lr=0.01, momentum=0.9)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    dist = Dist(Launch("single", rank=1), cuda)  # not the main rank: no progress bar reads
    counts = []
    for steps in (1, 2, 4):  # the first epoch (not compared) initialises cuDNN, cuBLAS and the allocators
        loader.sampler.set_epoch(0, skip=(4 - steps) * 6)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = engine.train_one_epoch(model, loader, opt, scaler, torch.nn.CrossEntropyLoss(), dist, "bf16",
                                             desc="t")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out["train_images"] == steps * 6
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[1] == counts[2], counts
    torch.cuda.set_sync_debug_mode("warn")  # the check sees syncs: three reads of the device, three warnings
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                torch.ones(1, device=cuda).sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum("synchroniz" in str(w.message) for w in caught) >= 3


@pytest.mark.parametrize("cache", ["on", "off"])
def test_bench_train_on_the_gpu(tiny_data, tmp_path, cache):
    out = tmp_path / "t.json"
    source = ["--synthetic"] if cache == "off" else ["-d", str(tiny_data)]
    bench.main(["train", *source, "--arch", "resnet18", "--resize", "72", "--crop", "64", "--padding", "4", "-b", "6",
                "--steps", "3", "--warmup", "2", "-w", "2", "--amp", "bf16", "--device", "cuda", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["images_per_second"] > 0 and r["loss_is_finite"] and r["device"] == torch.cuda.get_device_name()
    assert (r["prep_ms_per_batch"] < 5) if cache == "on" else "prep_ms_per_batch" not in r


@pytest.mark.parametrize("amp,cache", [("off", "auto"), ("bf16", "auto"), ("fp16", "auto"), ("bf16", "off")])
def test_one_gpu_trains_with_each_amp_mode(tiny_data, tmp_path, amp, cache):
    res = run_fgic(["-d", str(tiny_data), *cuda_args(), "-a", amp, "--cache", cache, "--output-dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr
    assert f"fgic: cache {'on' if cache == 'auto' else 'off'}" in res.stderr
    run = tmp_path / "tiny" / f"resnet18-{amp}-s2020"
    assert json.loads((run / "config.json").read_text())["device"].startswith("cuda")
    assert json.loads((run / "summary.json").read_text())["test_total"] == 101
    assert bool(torch.load(run / "checkpoint.pt", weights_only=True)["scaler"]) == (amp == "fp16")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_nccl_sync_bn_match_one(tiny_data, tmp_path):
    out = {}
    for n in (1, 2):
        res = run_fgic(["-d", str(tiny_data), *cuda_args(epochs=2, workers=0), "--output-dir", str(tmp_path / str(n))],
                       nproc=n)
        assert res.returncode == 0, res.stderr
        run = tmp_path / str(n) / "tiny" / "resnet18-off-s2020"
        out[n] = (torch.load(run / "checkpoint.pt", weights_only=True)["model"], read_jsonl(run / "metrics.jsonl"))
    diff = max((out[1][0][k] - out[2][0][k]).abs().max().item() for k in out[1][0] if k.endswith(("weight", "bias")))
    print(f"max abs weight difference, 2 GPUs vs 1: {diff:.3g}")
    assert diff < 1e-2
    assert [m["test_total"] for m in out[2][1]] == [101, 101]
    assert [m["test_correct"] for m in out[1][1]] == [m["test_correct"] for m in out[2][1]]
