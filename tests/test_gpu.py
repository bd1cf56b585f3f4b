"""CUDA-only paths (NCCL, fgic's synchronized BatchNorm without host syncs, CUDA AMP, batches cropped on the GPU, no
host sync per step or per evaluation batch, fused SGD under a skipped fp16 step, repeatable --deterministic runs, the
backbone families in bf16, channels-last and compiled): `pytest -m gpu` on a GPU machine (`bash tests/gpu/check.sh`
runs them with the benchmarks); skipped without CUDA."""
import copy
import json
import math
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from fgic import augment, bench, config, data, drop, engine, models, optim, syncbn
from fgic.batch import collate
from fgic.cluster import Launch
from fgic.dist import Dist
from tests.helpers import final_weights, max_difference, read_jsonl, run_fgic, same_result, tiny_args, train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_args(epochs=1, workers=2, amp="off"):
    return tiny_args(epochs=epochs, device="cuda", workers=workers, amp=amp)


def test_sync_batchnorm_on_cuda_is_fgics():
    def model():  # a new one for each call: the conversion replaces the children in place
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))

    assert type(models.sync_batchnorm(model(), torch.device("cuda"), True)[1]) is syncbn.AllReduceBatchNorm
    assert type(models.sync_batchnorm(model(), torch.device("cuda"), False, True)[1]) is torch.nn.BatchNorm2d


@pytest.fixture
def nccl_group():
    """A 1-rank NCCL process group in this process. fgic's BatchNorm given it explicitly synchronises over it (the
    all_gather, Chan's combination, the backward's all_reduce); torch's SyncBatchNorm on one rank is BatchNorm."""
    torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_fgic_sync_batchnorm_equals_torchs_on_an_nccl_group(nccl_group):
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    ref = torch.nn.SyncBatchNorm(8).to(cuda)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = syncbn.AllReduceBatchNorm(8, process_group=nccl_group).to(cuda)
    ours.load_state_dict(ref.state_dict())
    assert ours.synchronises()
    for _ in range(2):
        x = (torch.randn(6, 8, 5, 5, device=cuda) * 3 + 2).contiguous(memory_format=torch.channels_last)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [m(xi) for m, xi in zip((ref, ours), xs)]
        for o in outs:
            (o * torch.linspace(-1, 1, o.numel(), device=cuda).view(o.shape)).sum().backward()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-4)
    for k, t in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], t, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_no_host_sync_in_a_step_with_synchronized_batchnorm(nccl_group, compiled):
    """fgic's step with every BatchNorm synchronised over NCCL (the model with its loss, compiled or not; the
    Optimization fgic.ddp builds: fused SGD, gradient clipping, the per-step warmup schedule) under
    torch.cuda.set_sync_debug_mode("error"): no host sync at all (torch's SyncBatchNorm reads its counts to the host
    in each layer, pytorch#161302; fgic's earlier one read the global count). Not in it: the EMA, whose update (every
    --model-ema-steps steps) runs torch's AveragedModel, which reads its update count to the host."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model = syncbn.convert_sync_batchnorm(models.build("resnet18", 10, "none"), process_group=nccl_group)
    model = model.to(cuda).to(memory_format=torch.channels_last)
    flags = config.parse(["-d", "x", "--arch", "resnet18", "-b", "16", "--epochs", "2", "-a", "bf16",
                          "--clip-grad-norm", "1", "--lr-warmup-epochs", "1", "--lr-warmup-method", "linear"])
    opt = optim.build(model, cuda, flags, steps_per_epoch=3)
    assert opt.per_step and opt.clip_grad_norm == 1 and opt.ema is None
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    step_model = engine.WithLoss(model, criterion)
    step_model = torch.compile(step_model) if compiled else step_model
    batches = _task_batches(3, 64, 10, 16, cuda)
    keys = torch.arange(16, device=cuda)

    def step(x, y):
        loss, _ = engine.forward(step_model, x, y, criterion, cuda, "bf16", keys)
        opt.step(loss)
        return loss
    losses = [step(*batches[0])]  # warm-up, compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses += [step(x, y) for x, y in batches[1:]]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(v.item()) for v in losses) and opt.steps == 3


def test_batched_gpu_crop_equals_the_cpu_crops():
    images = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8)
    params = torch.tensor([augment.sample_params(1, 0, i, 40, 36, 4) for i in range(16)], dtype=torch.int16)
    on_gpu = augment.crop_flip_batch(images.cuda(), params.cuda(), 36, 4)
    assert on_gpu.is_cuda and on_gpu.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(on_gpu.cpu(), augment.crop_flip_batch(images, params, 36, 4))


def _loaders(root, cache):
    spec = data.DataSpec(resize=72, crop=64, padding=4, seed=5, batch_size=6, workers=2, cache=cache)
    return data.build(spec, root, 1, 0, pin_memory=True)


def test_cached_gpu_batches_equal_the_cpu_path_bit_for_bit(tiny_data):
    """The cache + the GPU's crop/flip/normalize give exactly the uncached loader's batches on the GPU, and exactly
    the CPU path's (PIL decode and resize, crop image by image, normalize on the CPU), cached or not."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    loaders = {(cache, dev): _loaders(tiny_data, cache) for cache in ("on", "off") for dev in (cuda, cpu)}
    for epoch in (0, 1):
        for _, _, train, _ in loaders.values():
            train.sampler.set_epoch(epoch)
        batches = [list(engine.DeviceBatches(train, dev)) for (_, dev), (_, _, train, _) in loaders.items()]
        assert [len(b) for b in batches] == [4, 4, 4, 4]
        for first, *others in zip(*batches):
            x = first.images
            assert x.is_cuda and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
            for other in others:
                assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(first, other, strict=True) if a is not None)
    tests = [list(engine.DeviceBatches(test, dev)) for (_, dev), (_, _, _, test) in loaders.items()]
    assert len(tests[0]) == 17  # 101 images in batches of 6
    for first, *others in zip(*tests, strict=True):
        assert all(torch.equal(first.images.cpu(), o.images.cpu()) and torch.equal(first.labels.cpu(), o.labels.cpu())
                   for o in others)


def _count_syncs(fn):
    """(fn(), the synchronisations torch's sync debug mode reports while it runs)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message) for w in caught)


def test_the_sync_count_sees_host_reads():
    """What the two no-sync tests below rely on: three reads of the device are three synchronisations."""
    cuda = torch.device("cuda")
    _, n = _count_syncs(lambda: [torch.ones(1, device=cuda).sum().item() for _ in range(3)])
    assert n >= 3


@pytest.mark.parametrize("cache", ["on", "off"])
def test_no_host_sync_per_training_step(tiny_data, cache):
    """The step, the device batches and the running totals never wait for the GPU: the synchronisations torch
    reports are the same for 2 steps as for 4 (the epoch's start and end read the totals once)."""
    cuda = torch.device("cuda")
    _, _, loader, _ = _loaders(tiny_data, cache)
    model = models.build("resnet18", 3, "none").to(cuda).to(memory_format=torch.channels_last)
    opt = optim.sgd(model.parameters(), cuda, lr=0.01, momentum=0.9)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    stepper = optim.Optimization(opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0), False,
                                 torch.amp.GradScaler(cuda.type, enabled=False), model)
    dist = Dist(Launch("single", rank=1), cuda)  # not the main rank: no progress bar reads
    counts = []
    for steps in (1, 2, 4):  # the first epoch (not compared) initialises cuDNN, cuBLAS and the allocators
        loader.sampler.set_epoch(0, skip=(4 - steps) * 6)
        out, n = _count_syncs(lambda: engine.train_one_epoch(model, loader, stepper, torch.nn.CrossEntropyLoss(),
                                                             dist, "bf16", desc="t"))
        assert out.metrics["images"] == steps * 6
        counts.append(n)
    assert counts[1] == counts[2], counts


@pytest.mark.parametrize("cache", ["on", "off"])
def test_no_host_sync_per_evaluation_batch(tiny_data, cache):
    """Evaluation's per-class counts, top-1 and top-5 stay on the device: the synchronisations torch reports are
    the same for 2 batches as for 4 (the totals are read once, at the end)."""
    cuda = torch.device("cuda")
    _, test_set, _, _ = _loaders(tiny_data, cache)
    model = models.build("resnet18", 3, "none").to(cuda).to(memory_format=torch.channels_last)
    dist = Dist(Launch("single", rank=1), cuda)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    counts = []
    for batches in (1, 2, 4):  # the first (not compared) initialises cuDNN and the allocators
        loader = DataLoader(test_set, batch_size=6, sampler=range(6 * batches), num_workers=2, pin_memory=True,
                            collate_fn=collate)
        out, n = _count_syncs(lambda: engine.evaluate(model, loader, criterion, dist, "bf16", 3))
        assert out["total"] == sum(out["class_total"]) == 6 * batches
        counts.append(n)
    assert counts[1] == counts[2], counts


SKIP_SCALE, NEXT_SCALE = 2.0 ** 70, 2.0 ** 10  # 2**70 overflows fp16 gradients; x 2**-60 backs off to 2**10


def _task_batches(n: int, size: int, classes: int, batch: int, device: torch.device) -> list:
    """n fixed batches of a task a few steps learn (each class a colour cast on noise), channels_last."""
    g = torch.Generator().manual_seed(0)
    palette = torch.rand(classes, 3, 1, 1, generator=g) * 2 - 1
    out = []
    for _ in range(n):
        labels = torch.randint(0, classes, (batch,), generator=g)
        images = torch.randn(batch, 3, size, size, generator=g) + 1.5 * palette[labels]
        out.append((images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)))
    return out


def _fp16_run(batches: list, fused: bool, skip: bool, device: torch.device) -> dict:
    """fgic's fp16 step (engine.sgd, engine.train_step) from the same initial weights. With `skip` the GradScaler
    starts at 2**70, so the first batch's step is skipped and the scale backs off to 2**10; without it the run
    starts at 2**10 on the second batch. Returns the final parameters and scale, and what the skipped step left."""
    torch.manual_seed(0)
    model = models.build("resnet18", 3, "none").to(device).to(memory_format=torch.channels_last)
    opt = optim.sgd(model.parameters(), device, lr=0.05, momentum=0.9, weight_decay=5e-4,
                    **({} if fused else {"fused": False}))
    assert bool(opt.defaults.get("fused")) == fused
    scaler = torch.amp.GradScaler(device.type, init_scale=SKIP_SCALE if skip else NEXT_SCALE, backoff_factor=2.0 ** -60)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    # The caching allocator hands freed blocks of a size out again for that size: a momentum buffer left
    # uninitialised (empty_like) by the first step would hold 1e20, not whatever fresh memory holds (zeros hide it).
    poison = [torch.full_like(p, 1e20) for p in params for _ in range(4)]
    del poison
    after_skip = None
    for i, (images, labels) in enumerate(batches if skip else batches[1:]):
        train_step(model, images, labels, opt, scaler, criterion, device, "fp16")
        if skip and i == 0:
            buffers = [b for p in params if (b := opt.state[p].get("momentum_buffer")) is not None]
            after_skip = {"scale": scaler.get_scale(), "moved": _max_diff([p.detach() for p in params], before),
                          "buffers": _max_diff(buffers, [torch.zeros_like(b) for b in buffers]) if buffers else 0.0}
    return {"params": [p.detach().clone() for p in params], "scale": scaler.get_scale(), "after_skip": after_skip}


def _max_diff(a: list, b: list) -> float:
    """The largest |a - b| over lists of tensors; NaN if any is (Python's max would pass a NaN over)."""
    return torch.stack([(x - y).abs().max() for x, y in zip(a, b, strict=True)]).max().item()


def test_fp16_skipped_first_step_leaves_the_weights_of_plain_sgd():
    """A first fp16 step that the GradScaler skips leaves no trace: afterwards fused SGD (fgic's default on a GPU)
    and torch's non-fused SGD end where plain SGD without the skip ends, as close as the two kernels' rounding alone
    puts them (the same runs without the skip). Uninitialised momentum (torch's fused SGD after a skipped first
    step) is off by ~1e20 x lr."""
    cuda = torch.device("cuda")
    batches = _task_batches(4, 64, 3, 8, cuda)
    deterministic, benchmark = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # the runs differ by SGD alone
    try:
        runs = {(fused, skip): _fp16_run(batches, fused, skip, cuda)
                for fused in (True, False) for skip in (True, False)}
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, benchmark
    for fused in (True, False):
        assert runs[fused, True]["after_skip"] == {"scale": NEXT_SCALE, "moved": 0.0, "buffers": 0.0}
    assert {r["scale"] for r in runs.values()} == {NEXT_SCALE}  # no later step was skipped
    plain = runs[False, False]["params"]
    control = _max_diff(runs[True, False]["params"], plain)  # fused vs non-fused kernel, no skip: rounding alone
    fused_skip, plain_skip = (_max_diff(runs[fused, True]["params"], plain) for fused in (True, False))
    print(f"max |weight difference| from plain SGD without the skip: fused after the skip {fused_skip:.3g}, "
          f"non-fused after the skip {plain_skip:.3g}; rounding control (fused, no skip) {control:.3g}")
    assert fused_skip <= 2 * control + 1e-5 and plain_skip <= 2 * control + 1e-5


AMP_LOSS_REL = 0.05  # "a few percent": each step's loss within 5% of fp32's (calibrated on the CPU: <= 1.7%)


def _amp_losses(amp: str, device: torch.device) -> list[float]:
    """The losses of fgic's step over 8 fixed batches (resnet18 at 112 px, batch 32, 10 classes, the recipe's
    momentum, weight decay and label smoothing, lr 0.01), from the same initial weights. No fp16 step may be skipped
    (the runs would not take the same steps): on the CPU the first overflow comes at a scale of 2**18, not 2**16."""
    torch.manual_seed(0)
    model = models.build("resnet18", 10, "none").to(device).to(memory_format=torch.channels_last)
    opt = optim.sgd(model.parameters(), device, lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # as fgic.ddp makes it
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    losses = []
    for images, labels in _task_batches(8, 112, 10, 32, device):
        loss, _ = train_step(model, images, labels, opt, scaler, criterion, device, amp)
        losses.append(loss.item())
    assert scaler.get_scale() == 2.0 ** 16 if amp == "fp16" else not scaler.is_enabled()  # GradScaler's start
    return losses


@pytest.fixture(scope="module")
def fp32_losses():
    return _amp_losses("off", torch.device("cuda"))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_losses_stay_within_a_few_percent_of_fp32(fp32_losses, amp):
    """bf16 and fp16 train like fp32 (-a off, with torch's defaults, as fgic runs it): each step's loss within 5% of
    fp32's. The fp32 loss falls by over a fifth meanwhile, so a run that did not learn would be far outside."""
    assert fp32_losses[-1] < 0.8 * fp32_losses[0], fp32_losses
    losses = _amp_losses(amp, torch.device("cuda"))
    rel = [abs(a - b) / b for a, b in zip(losses, fp32_losses, strict=True)]
    print(f"{amp} losses {[round(v, 4) for v in losses]}\nfp32 losses {[round(v, 4) for v in fp32_losses]}\n"
          f"largest relative difference {max(rel):.4f} (limit {AMP_LOSS_REL})")
    assert max(rel) <= AMP_LOSS_REL


# Issue 14's families as fgic.ddp trains them on a GPU: channels-last, bf16, the keyed masks, eager and compiled (a
# compile costs tens of seconds, the eager steps a second).
GPU_FAMILIES = [("vit_b_16", 224), ("convnext_tiny", 224), ("swin_t", 224), ("maxvit_t", 224),
                ("efficientnet_v2_s", 224), ("regnet_y_400mf", 224), ("timm:test_vit", 64), ("timm:test_byobnet", 64)]


def _family_losses(model: torch.nn.Module, compiled: bool, start: dict, batches: list, cuda: torch.device) -> list:
    """Each step's loss from `start`; compiled as --compile does, the model with its loss (engine.WithLoss)."""
    model.load_state_dict(start)
    opt = optim.sgd(model.parameters(), cuda, lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(cuda.type, enabled=False)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    step_model = torch.compile(engine.WithLoss(model, criterion)) if compiled else model
    keys = torch.arange(len(batches[0][1]), device=cuda)
    return [train_step(step_model, x, y, opt, scaler, criterion, cuda, "bf16", keys=keys + 100 * i)[0].item()
            for i, (x, y) in enumerate(batches)]


@pytest.mark.parametrize("arch,crop", GPU_FAMILIES)
def test_each_family_trains_channels_last_in_bf16(arch, crop):
    """4 steps on a task they learn: finite losses that fall, the masks keyed; compiled with the loss (inductor,
    Triton), each step's loss within AMP_LOSS_REL of eager's (both bf16: only the kernels' rounding differs)."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    rates = {"dropout": 0.1} if arch == "vit_b_16" else {"stochastic_depth": 0.1} if arch.startswith("timm:") else {}
    model = models.build(arch, 10, "none", crop=crop, **rates).to(cuda).to(memory_format=torch.channels_last)
    assert arch.startswith("regnet") or any(isinstance(m, drop.KeyedDrop) and m.p > 0 for m in model.modules())
    start = copy.deepcopy(model.state_dict())
    batches = _task_batches(4, crop, 10, 16, cuda)
    eager = _family_losses(model, False, start, batches, cuda)
    print(f"{arch} at {crop} px, bf16 losses {[round(v, 4) for v in eager]}")
    assert all(map(math.isfinite, eager)) and eager[-1] < eager[0], eager
    ours = _family_losses(model, True, start, batches, cuda)
    print(f"compiled {[round(v, 4) for v in ours]}")
    assert max(abs(a - b) / b for a, b in zip(ours, eager, strict=True)) <= AMP_LOSS_REL, (ours, eager)


@pytest.mark.parametrize("cache", ["on", "off"])
def test_bench_train_on_the_gpu(tiny_data, tmp_path, cache):
    out = tmp_path / "t.json"
    source = ["--synthetic"] if cache == "off" else ["-d", str(tiny_data)]
    bench.main(["train", *source, "--arch", "resnet18", "--resize", "72", "--crop", "64", "--padding", "4", "-b", "6",
                "--steps", "3", "--warmup", "2", "-w", "2", "--amp", "bf16", "--device", "cuda", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["images_per_second"] > 0 and r["loss_is_finite"] and r["device"] == torch.cuda.get_device_name()
    assert (r["prep_ms_per_batch"] < 5) if cache == "on" else "prep_ms_per_batch" not in r


@pytest.mark.e2e
@pytest.mark.parametrize("amp,cache", [("off", "auto"), ("bf16", "auto"), ("fp16", "auto"), ("bf16", "off"),
                                       ("auto", "auto")])
def test_one_gpu_trains_with_each_amp_mode(tiny_data, tmp_path, amp, cache):
    """-a auto (the default) resolves to bf16 on a GPU that has it, fp16 on one without, in the folder's name and in
    config.json."""
    res = run_fgic(["-d", str(tiny_data), *cuda_args(amp=amp), "--cache", cache, "--output-dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr
    assert f"fgic: cache {'on' if cache == 'auto' else 'off'}" in res.stderr
    if amp == "auto":
        amp = "bf16" if torch.cuda.get_device_capability(0)[0] >= 8 else "fp16"  # native bf16 (engine.has_bf16)
    run = tmp_path / "tiny" / f"resnet18-{amp}-s2020"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["device"].startswith("cuda") and cfg["amp"] == amp
    assert json.loads((run / "summary.json").read_text())["test_total"] == 101
    assert bool(torch.load(run / "checkpoint.pt", weights_only=True)["scaler"]) == (amp == "fp16")


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_gpus_nccl_sync_bn_match_one(tiny_data, tmp_path, compiled):
    out = {}
    for n in (1, 2):
        res = run_fgic(["-d", str(tiny_data), *cuda_args(epochs=2, workers=0), *(["--compile"] if compiled else []),
                        "--output-dir", str(tmp_path / str(n))], nproc=n)
        assert res.returncode == 0, res.stderr
        run = tmp_path / str(n) / "tiny" / "resnet18-off-s2020"
        out[n] = (torch.load(run / "checkpoint.pt", weights_only=True)["model"], read_jsonl(run / "metrics.jsonl"))
    diff = max((out[1][0][k] - out[2][0][k]).abs().max().item() for k in out[1][0] if k.endswith(("weight", "bias")))
    print(f"max abs weight difference, 2 GPUs vs 1{', compiled' if compiled else ''}: {diff:.3g}")
    assert diff < 1e-2
    assert [m["test_total"] for m in out[2][1]] == [101, 101]
    assert [m["test_correct"] for m in out[1][1]] == [m["test_correct"] for m in out[2][1]]


@pytest.mark.e2e
def test_one_gpu_compiled_trains_as_eager_does_within_rounding(tiny_data, tmp_path):
    """fgic.ddp --compile on one GPU, in the default mode and with CUDA graphs (--compile-mode reduce-overhead): every
    record says compiled, and the weights end within 10x the rounding control of the eager run's (the control: the
    eager run with each batch's samples reversed), as on the CPU (tests/test_compile.py)."""
    args = ["-d", str(tiny_data), *cuda_args(epochs=1)]
    res = run_fgic([*args, "--output-dir", str(tmp_path / "control")], timeout=900,
                   program=("-m", "tests.rounding_control", "--plain-to", str(tmp_path / "eager")))
    assert res.returncode == 0, res.stderr

    def weights(name: str) -> dict:
        return final_weights(tmp_path / name / "tiny" / "resnet18-off-s2020")
    eager = weights("eager")
    control = max_difference(weights("control"), eager)
    for mode in ("default", "reduce-overhead"):
        res = run_fgic([*args, "--compile", "--compile-mode", mode, "--output-dir", str(tmp_path / mode)], timeout=900)
        assert res.returncode == 0 and "fgic: --compile: first step" in res.stdout, res.stderr[-3000:]
        assert all(r["compiled"] for r in read_jsonl(tmp_path / mode / "tiny" / "resnet18-off-s2020" /
                                                     "metrics.jsonl"))
        diff = max_difference(weights(mode), eager)
        print(f"max abs weight difference from eager, compiled ({mode}): {diff:.3g}; rounding control {control:.3g}")
        assert 0 < control and diff <= 10 * control, (mode, diff, control)


@pytest.mark.e2e
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_deterministic_one_gpu_run_is_repeatable_bitwise(tiny_data, tmp_path, amp):
    """Two `python -m fgic.ddp --deterministic` runs on 1 GPU: bitwise equal weights, equal metrics."""
    runs = []
    for name in ("a", "b"):
        res = run_fgic(["-d", str(tiny_data), *cuda_args(epochs=2), "-a", amp, "--output-dir", str(tmp_path / name)])
        assert res.returncode == 0, res.stderr
        runs.append(tmp_path / name / "tiny" / f"resnet18-{amp}-s2020")
    assert json.loads((runs[0] / "config.json").read_text())["deterministic"] is True
    same_result(runs[1], runs[0])


def test_predict_on_the_gpu_gives_the_cpus_classes(tiny_data, tmp_path):
    res = run_fgic(["-d", str(tiny_data), *tiny_args(epochs=1), "--output-dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr
    run = tmp_path / "tiny" / "resnet18-off-s2020"
    out = {}
    for device, amp in (("cpu", "off"), ("cuda", "off"), ("cuda", "bf16")):
        res = run_fgic([str(run), str(tiny_data / "test"), "-q", "--device", device, "-a", amp, "-o",
                        str(tmp_path / f"{device}-{amp}")], program=("-m", "fgic.predict"))
        assert res.returncode == 0 and f"on {device}" in res.stdout, res.stderr
        out[device, amp] = json.loads((tmp_path / f"{device}-{amp}.json").read_text())["predictions"]
    cpu, gpu, bf16 = out["cpu", "off"], out["cuda", "off"], out["cuda", "bf16"]
    assert [p["path"] for p in gpu] == [p["path"] for p in cpu] and len(cpu) == 101
    assert max(abs(a["top"][0]["prob"] - b["top"][0]["prob"]) for a, b in zip(gpu, cpu)) < 1e-3  # TF32 convolutions
    same = sum(a["top"][0]["class"] == b["top"][0]["class"] for a, b in zip(bf16, cpu))
    assert same >= 95, f"bf16 agrees with fp32 on {same}/101 images"
