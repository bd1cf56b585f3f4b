"""The training step and the evaluation: fgic's optimizer on a step the GradScaler skips, exact per-class counts."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fgic import augment, config, ddp, engine, optim
from fgic.batch import Batch
from fgic.cluster import Launch
from fgic.dist import Dist
from fgic.errors import FgicError
from tests.helpers import train_step


def _fp16_steps(fused: bool, skip_first: bool) -> torch.Tensor:
    """Four of fgic's training steps in fp16 with its optimizer settings; with `skip_first` the GradScaler's first
    scale (2^70) overflows, so that step is skipped, and the backoff leaves 2^10 for the rest."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5))
    optimizer = optim.sgd(model.parameters(), cpu, fused=fused, lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert bool(optimizer.defaults["fused"]) == fused  # the fused kernel, not a fallback
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 70 if skip_first else 2.0 ** 10, backoff_factor=2.0 ** -60)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    images, labels = torch.randn(8, 3, 12, 12), torch.arange(8) % 5
    for _ in range(64):  # freed blocks full of large numbers: what an uninitialised buffer then holds
        torch.full((1024,), 3.4e25)
    for step in range(4):
        train_step(model, images, labels, optimizer, scaler, criterion, cpu, "fp16")
        if step == 0:
            assert scaler.get_scale() == 2.0 ** 10  # skipped and backed off, or not skipped
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_skipped_first_fp16_step_leaves_no_momentum_for_the_fused_kernel():
    """torch's fused SGD (the GPU path; it runs on the CPU too) made its momentum buffers with empty_like at a step
    the GradScaler then skipped, and applied the garbage at the next one. Compared like with like: the fused and the
    plain kernel differ by their rounding only (the control, without a skipped step) or not at all."""
    control = (_fp16_steps(True, False) - _fp16_steps(False, False)).abs().max().item()
    skipped = (_fp16_steps(True, True) - _fp16_steps(False, True)).abs().max().item()
    print(f"fused vs plain SGD, max weight difference: {control:.3g} without a skipped step, {skipped:.3g} with one")
    assert skipped <= max(10 * control, 1e-6), (skipped, control)


class Batches(list):
    """Batch(uint8 images, labels) batches standing in for a loader."""
    dataset = SimpleNamespace(to_device=lambda batch, device: batch, normalization=augment.IMAGENET)


def test_evaluation_counts_each_class_exactly():
    """The per-class tallies (index_add_, no host sync on a GPU) against a plain count of the same predictions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    data = [Batch(torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8), torch.randint(0, 7, (5,))) for _ in range(4)]
    loader = Batches(data)
    out = engine.evaluate(model, loader, nn.CrossEntropyLoss(), Dist(Launch("single"), torch.device("cpu")), "off", 7)
    correct, total = [0] * 7, [0] * 7
    with torch.inference_mode():
        for batch in loader:
            batch = engine.inputs(loader, batch, torch.device("cpu"))
            images, labels = batch.images, batch.labels
            assert batch.keys is None  # test batches
            for label, pred in zip(labels.tolist(), model(images).argmax(1).tolist()):
                total[label] += 1
                correct[label] += pred == label
    assert out["class_total"] == total and out["class_correct"] == correct and sum(total) == out["total"] == 20
    assert out["correct"] == sum(correct)


def test_amp_auto_is_the_seeds_float32_on_the_cpu():
    """-a auto, the default: off on the CPU (its records and run folder names stay the seed's); explicit modes stay."""
    args = config.parse(["-d", "demo"])
    assert args.amp == "auto"
    cpu = torch.device("cpu")
    assert [engine.resolve_amp(a, cpu) for a in ("auto", "off", "bf16", "fp16")] == ["off", "off", "bf16", "fp16"]


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, as fgic.engine asks torch about it."""
    def make(major: int, name: str) -> torch.device:
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # as on a V100
        return torch.device("cuda", 0)
    return make


def test_amp_auto_is_fp16_on_a_gpu_whose_bfloat16_is_emulated(gpu):
    """torch.cuda.is_bf16_supported() says yes on a V100 or T4 (emulation); -a auto there is fp16, as documented, and
    an explicit -a bf16 is refused in one line."""
    v100 = gpu(7, "Tesla V100-SXM2-32GB")
    assert engine.resolve_amp("auto", v100) == "fp16" and not engine.has_bf16(v100)
    with pytest.raises(FgicError, match=r"^-a/--amp bf16: Tesla V100-SXM2-32GB has no native bfloat16 .*; use -a fp16"):
        engine.check_amp("bf16", v100)
    engine.check_amp("fp16", v100)
    a100 = gpu(8, "NVIDIA A100-SXM4-80GB")
    assert engine.resolve_amp("auto", a100) == "bf16" and engine.has_bf16(a100)
    engine.check_amp("bf16", a100)


def job_checkpoint(run_dir, job: str) -> None:
    run_dir.mkdir(parents=True)
    torch.save({"model": {}, "epoch": 3, "config": {"slurm_job_id": job}}, run_dir / "checkpoint.pt")


@pytest.mark.parametrize("started,now,job,restart,expected", [
    ("fp16", 8, "77", "1", "fp16"),  # started on a V100, requeued onto an A100: continued in fp16
    ("bf16", 7, "77", "1", "refused"),  # started on an A100, requeued onto a V100
    ("fp16", 8, "76", "1", "bf16"),  # another job's fp16 run (-a fp16 given): this one trains its own bf16 run
    ("fp16", 8, "77", "0", "bf16"),  # the job's first start
    ("bf16", 8, "77", "1", "bf16"),
])
def test_amp_auto_continues_the_requeued_jobs_run_in_the_mode_it_started_in(tmp_path, monkeypatch, capsys, gpu,
                                                                            started, now, job, restart, expected):
    device = gpu(now, "GPU")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
    args = config.parse(["-d", "demo", "--output-dir", str(tmp_path)])
    job_checkpoint(tmp_path / "demo" / f"resnet18-{started}-s2020", job)
    if expected == "refused":
        with pytest.raises(FgicError, match=rf"^-a auto: this requeued job's run {tmp_path}/demo/resnet18-bf16-s2020 "
                                            r"trains in bf16, which this GPU lacks; resubmit it for a GPU"):
            ddp.auto_amp(args, "demo", device, say=True)
        return
    assert ddp.auto_amp(args, "demo", device, say=True) == expected
    notice = capsys.readouterr().err
    assert ("-a auto continues this requeued job's run" in notice) == (expected != engine.resolve_amp("auto", device))
