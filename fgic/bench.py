"""Throughput benchmarks: the host-side loader (the recipe's PIL pipeline beside fgic's cache) and training images/s.

  python -m fgic.bench loader --make-data DIR --images 1024      a dataset of 500x375 JPEGs to measure on
  python -m fgic.bench loader -d DIR [-w N] [--json FILE]         images/s each pipeline hands to the device
  python -m fgic.bench train --synthetic|-d DIR [--pipeline fgic|original] [--arch resnet50 --crop 448 --amp bf16
                             -b 128 --steps N] [--compile [--compile-mode M]] [--reference] [--json FILE]
                                                                  training images/s, the share of the FLOP ceiling,
                                                                  and with --reference the ratio to a plain PyTorch step
  --recipe NAME (loader, train)                                   with fgic.ddp's preset: its policies, mixing,
                                                                  optimizer, clipping and EMA in the timed work
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from torchvision import datasets
from torchvision import transforms as T

from fgic import augment, cluster, compiling, config, data, demo, drop, engine, images, models, optim, syncbn
from fgic.batch import Batch, collate
from fgic.cli import run_cli
from fgic.config import RECIPE
from fgic.dist import Dist, pick_device
from fgic.errors import FgicError

# Dense bf16/fp16 tensor-core peaks from the vendors' spec sheets, TFLOP/s, by a substring of the device name (the
# first that matches: the H100's PCIe and NVL cards before the SXM's plain "H100 80GB HBM3").
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0,
               "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A40": 150.0, "A10": 125.0, "V100": 125.0}


class OriginalFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with fgic's classes (hidden folders such as .ipynb_checkpoints are none), its items
    Batch(image, label)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        names = images.split_classes(directory)
        return names, {name: i for i, name in enumerate(names)}

    def __getitem__(self, index: int) -> Batch:
        image, label = super().__getitem__(index)
        return Batch(image, label)


def recipe_loader(root: Path, resize: int, crop: int, padding: int, batch: int, workers: int, pin: bool):
    """The recipe's original pipeline: ImageFolder + PIL transforms producing normalised float batches."""
    tf = T.Compose([T.Resize((resize, resize)), T.RandomCrop(crop, padding=padding), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(augment.IMAGENET.mean, augment.IMAGENET.std)])
    ds = OriginalFolder(str(root / "train"), tf)
    if len(ds) < batch:
        raise FgicError(f"-b/--batch-size {batch}: {root / 'train'} has only {len(ds)} images")
    return DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0, collate_fn=collate)


def fgic_loader(a, root: Path, pin: bool):
    """fgic's training loader of the recipe's data flags (recipe_flags), reading the decoded-image cache (built and
    paged in here, before any timing)."""
    spec = dataclasses.replace(data.DataSpec.of(recipe_flags(a)), seed=0, workers=a.workers, cache="on",
                               cache_dir=a.cache_dir)
    loader = data.build(spec, root, 1, 0, pin_memory=pin)[2]
    int(np.asarray(loader.dataset.rows()).reshape(-1)[::4096].sum())  # map every page now, not while timing
    return loader


def recipe_flags(a) -> argparse.Namespace:
    """fgic.ddp's flags resolved for --recipe at the benchmark's sizes, arch and batch (the lr by its rule)."""
    argv = ["-d", "bench", "--recipe", a.recipe, "-b", str(a.batch_size), "--resize", str(a.resize), "--crop",
            str(a.crop), "--padding", str(a.padding), "--arch", getattr(a, "arch", RECIPE["arch"])]
    flags = config.parse(argv)
    flags.mean, flags.std = augment.IMAGENET  # the benchmark's models are built without weights
    return flags


def endless(loader):
    """Batches across epochs, as training sees them."""
    for epoch in itertools.count():
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader


def images_per_second(loader, batches: int, warmup: int) -> float:
    it = endless(loader)
    for _ in range(warmup):
        next(it)
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        count += len(next(it).labels)
    seconds = time.perf_counter() - start
    del it
    gc.collect()
    return count / seconds


# ----------------------------------------------------------------------------------------------------- loader


def loader_cmd(a) -> dict:
    if a.make_data:
        written = demo.make_photos(Path(a.make_data), a.images, workers=data.usable_cpus())
        print(f"fgic.bench: wrote {a.images} train and {written - a.images} test JPEGs (500x375) to {a.make_data}")
        return {}
    root = _data_root(a.data)
    pin = torch.cuda.is_available()
    extra = data.DataSpec.of(recipe_flags(a)).extra
    t0 = time.perf_counter()
    ours = fgic_loader(a, root, pin)
    cache_seconds = time.perf_counter() - t0
    base = recipe_loader(root, a.resize, a.crop, a.padding, a.batch_size, a.workers, pin)
    base_rate = images_per_second(base, a.batches, a.warmup)
    del base
    gc.collect()
    ours_rate = images_per_second(ours, a.batches, a.warmup)
    # What the device then does with fgic's batch, timed here on the CPU for orientation (on a GPU it is far less).
    batch = next(iter(ours))
    start = time.perf_counter()
    for _ in range(3):
        augment.normalize(ours.dataset.to_device(batch, torch.device("cpu")).images, augment.IMAGENET)
    cpu_prep = 3 * len(batch.labels) / (time.perf_counter() - start)
    result = {"baseline_images_per_second": base_rate, "fgic_images_per_second": ours_rate,
              "ratio": ours_rate / base_rate, "workers": a.workers, "batch_size": a.batch_size,
              "batches_timed": a.batches, "warmup_batches": a.warmup, "resize": a.resize, "crop": a.crop,
              "images": len(ours.dataset), "cache_ready_seconds": cache_seconds, "recipe": a.recipe,
              "fgic_device_work_on_this_cpu_images_per_second": cpu_prep, "cpus": data.usable_cpus(), "pin_memory": pin}
    print(f"host-side loader throughput, {a.workers} workers, batch {a.batch_size}, {a.batches} batches timed after "
          f"{a.warmup} warm-up batches; the cache was ready before timing ({cache_seconds:.1f} s to build or open)")
    what = "crop/flip draws" if extra == augment.Extra() else \
        f"--recipe {a.recipe}'s per-image policies{' and partners' if extra.mixing else ''} in the workers"
    _table([("original: ImageFolder + PIL Resize/RandomCrop/Flip/ToTensor/Normalize -> float", base_rate),
            (f"fgic: uint8 resized images gathered from the cache + {what}", ours_rate)])
    print(f"ratio fgic / original: {ours_rate / base_rate:.1f}x   (fgic's crop, flip and normalize then run on the "
          f"device; on this CPU they would take {cpu_prep:.0f} img/s)")
    return result


# ------------------------------------------------------------------------------------------------------ train


def train_cmd(a) -> dict:
    with tempfile.TemporaryDirectory(prefix="fgic-bench-") as run_dir:  # --compile's run folder (its mega-cache)
        return train(a, Path(run_dir))


def train(a, run_dir: Path) -> dict:
    if a.synthetic == bool(a.data):
        raise FgicError("train: give -d PATH (real data) or --synthetic, one of them")
    if a.synthetic and a.pipeline == "original":
        raise FgicError("--pipeline original needs -d PATH (it reads JPEGs)")
    if a.pipeline == "original" and a.recipe != "seed":
        raise FgicError(f"--pipeline original --recipe {a.recipe}: the original pipeline has the seed's augmentation "
                        f"only; use --pipeline fgic")
    if a.sync_bn and a.no_batchnorm:
        raise FgicError("--sync-bn --no-batchnorm: there is no BatchNorm left to synchronise; give one of them")
    device = pick_device(a.device, [], 0)
    models.check_arch(a.arch)
    models.check_input(a.arch, a.crop)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    root = _data_root(a.data) if a.data else None
    classes = len(data.check_layout(root)) if root else a.num_classes
    model = models.build(a.arch, classes, "none", crop=a.crop).to(device)
    if a.no_batchnorm:
        model = without_batchnorm(model)
    flops = step_flops(model, a, device, nn.CrossEntropyLoss())  # on a copy: before --sync-bn's group, which has none
    if a.sync_bn:  # fgic.ddp's BatchNorm of several processes, on a group of one: its cost beside plain BatchNorm
        model = syncbn.convert_sync_batchnorm(model, process_group=one_process_group(device))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        engine.check_amp(a.amp, device)
    flags = recipe_flags(a)
    flags.amp = a.amp
    extra = data.DataSpec.of(flags).extra
    opt = optim.build(model, device, flags, steps_per_epoch=a.warmup + a.steps)  # fgic.ddp's
    criterion = nn.CrossEntropyLoss(label_smoothing=flags.label_smoothing)
    # --compile: fgic.ddp's compiled step (the model with its loss, the backward compiled at once, the buffers kept for
    # the eager fallback, the mega-cache written after the first step: all of it in the warm-up a run pays)
    step_model = compiling.compiled(engine.WithLoss(model, criterion), Dist(cluster.Launch("single"), device),
                                    a.compile_mode, run_dir, None) if a.compile else model
    pin = device.type == "cuda"

    # One batch kept on the device: the synthetic source, and the reference step's input on every source.
    batch = synthetic_batch(a, classes, device) if a.synthetic or a.reference else None
    if a.synthetic:
        source = synthetic_mixed(batch, extra, a.crop, classes) if extra.mixing else itertools.repeat(batch)
        what = "synthetic batch already on the device" + (", mixed with itself rolled by one" if extra.mixing else "")
    elif a.pipeline == "fgic":
        loader = fgic_loader(a, root, pin)
        source = _endless_device(loader, device)
        what = (f"fgic: the cache -> {a.workers} workers -> crop/flip/normalize on the {device.type}"
                if loader.dataset.device_crops else
                f"fgic: the cache -> {a.workers} workers making --recipe {a.recipe}'s items -> mixing on the "
                f"{device.type}")
    else:
        loader = recipe_loader(root, a.resize, a.crop, a.padding, a.batch_size, a.workers, pin)
        layout = torch.channels_last if pin else torch.contiguous_format
        source = (Batch(b.images.to(device, non_blocking=True).contiguous(memory_format=layout),
                        b.labels.to(device, non_blocking=True)) for b in endless(loader))
        what = f"original: ImageFolder + PIL transforms, {a.workers} workers, float batches copied to the device"

    fixed = torch.tensor([augment.drop_key(0, 0, i) for i in range(a.batch_size)], device=device)
    def step():
        batch = next(source)  # the loader's drop keys, or fixed ones for a source without
        loss, _ = engine.forward(step_model, batch.images, batch.labels, criterion, device, a.amp,
                                 fixed if batch.keys is None else batch.keys)
        opt.step(loss)
        return loss
    seconds, loss, warmup = timed(step, a, device)
    if a.compile and not step_model.compiled:  # fgic.ddp would go on eager: an eager rate is no compiled figure
        raise FgicError(f"--compile: the compile failed ({step_model.reason}); no compiled figure to give")
    skips = counters["inductor"]["cudagraph_skips"]  # inductor runs the graphs without CUDA graphs, and says why
    if hasattr(source, "close"):
        source.close()  # its producer and loader workers stop before prep_cost reads the loader again
    rate = a.steps * a.batch_size / seconds
    peak, peak_from = _peak(a, device)
    achieved = flops * a.steps / seconds
    result = {"images_per_second": rate, "step_ms": 1000 * seconds / a.steps, "source": "synthetic" if a.synthetic
              else a.pipeline, "arch": a.arch, "crop": a.crop, "amp": a.amp, "batch_size": a.batch_size,
              "steps_timed": a.steps, "warmup_steps": a.warmup, "warmup_seconds": warmup, "workers": a.workers,
              "compile": a.compile, "compile_mode": a.compile_mode if a.compile else None,
              "cudagraph_skips": skips if a.compile_mode == "reduce-overhead" and a.compile else None,
              "recipe": a.recipe, "step": step_name(flags), "sync_bn": a.sync_bn,
              "batchnorm": not a.no_batchnorm,
              "synchronised_batchnorms": sum(isinstance(m, syncbn.AllReduceBatchNorm) and m.synchronises()
                                             for m in model.modules()),
              "device": _device_name(device), "step_flops": flops, "achieved_tflops": achieved / 1e12,
              "peak_tflops": peak, "peak_from": peak_from,
              "fraction_of_peak": achieved / (peak * 1e12) if peak else None,
              "loss_is_finite": bool(torch.isfinite(loss).item()), "torch": torch.__version__}
    if not a.synthetic and a.pipeline == "fgic" and loader.dataset.device_crops:
        result.update(prep_cost(loader, device, seconds / a.steps))
    if a.reference:
        ref_seconds, _, ref_warmup = timed(reference_step(a, classes, batch), a, device)
        ref = a.steps * a.batch_size / ref_seconds
        result.update(reference_images_per_second=ref, reference_ratio=rate / ref, reference_warmup_seconds=ref_warmup)
    print(f"training throughput on {result['device']}: {a.arch} at {a.crop} px, amp {a.amp}, batch {a.batch_size}, "
          f"{a.steps} steps timed after {a.warmup} warm-up steps ({warmup:.1f} s)"
          f"{f', compiled (mode {a.compile_mode})' if a.compile else ''}"
          f"{', synchronised BatchNorm on a group of one process' if a.sync_bn else ''}"
          f"{', BatchNorm removed (a bound, not a model that trains well)' if a.no_batchnorm else ''}")
    print(f"data: {what}")
    rows = [(f"training (forward + backward + {step_name(flags)})", rate)]
    if a.reference:
        rows.append((f"reference: plain PyTorch step{', compiled' if a.compile else ''} (below)",
                     result["reference_images_per_second"]))
    _table(rows)
    if a.reference:
        print(f"ratio fgic / reference: {result['reference_ratio']:.2f}x   (the same device, input and batch, "
              f"{a.steps} steps each, timed one after the other; the reference: {REFERENCE})")
    frac = f"{100 * result['fraction_of_peak']:.1f}% of the {peak:g} TFLOP/s ceiling ({peak_from})" if peak else \
        "no FLOP ceiling known for this device (--peak-tflops sets one)"
    print(f"model FLOPs per step {flops / 1e12:.2f} TFLOP (counted), achieved {achieved / 1e12:.1f} TFLOP/s = {frac}")
    if "prep_ms_per_batch" in result:
        print(f"crop/flip/normalize on the {device.type}: {result['prep_ms_per_batch']:.2f} ms per batch = "
              f"{100 * result['prep_fraction_of_step']:.2f}% of a step")
    return result


def synthetic_batch(a, classes: int, device: torch.device) -> Batch:
    """A normalised batch of random pixels and labels on the device (channels_last on a GPU)."""
    x = augment.normalize(torch.randint(0, 256, (a.batch_size, 3, a.crop, a.crop), dtype=torch.uint8,
                                        device=device), augment.IMAGENET)
    return Batch(x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x,
                 torch.randint(0, classes, (a.batch_size,), device=device))


def one_process_group(device: torch.device):
    """A process group of this process alone (NCCL on a GPU, gloo on the CPU), for --sync-bn's collectives. Named
    explicitly, it makes every layer gather and reduce over it (AllReduceBatchNorm skips both on a world of one)."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
    return torch.distributed.group.WORLD


def without_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` replaced by nothing (timm's BatchNormAct2d by its activation): the same step without
    the memory-bound normalisation, what bounds a convolutional network's rate beside its convolutions."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.act if syncbn.norm_act(module) else nn.Identity()
    for name, child in module.named_children():
        setattr(module, name, without_batchnorm(child))
    return module


def timed(step, a, device) -> tuple[float, torch.Tensor, float]:
    """Seconds for `a.steps` calls of `step` after `a.warmup` others, the last loss, and the warm-up's seconds (the
    compile, cuDNN's trials: what a whole run pays once at its start, beside its steps at the timed rate)."""
    start = time.perf_counter()
    for _ in range(a.warmup):
        step()
    _sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    _sync(device)
    return time.perf_counter() - start, loss, warmup


REFERENCE = "the arch without fgic's keyed drop, channels_last on a GPU, autocast, SGD fused on a GPU, label smoothing"


def reference_step(a, classes: int, batch: Batch):
    """The yardstick: a plain PyTorch training step on `batch` (kept on the device), as a user would write it from
    torchvision's reference (torch.compile'd with --compile)."""
    images, labels = batch.images, batch.labels
    device = images.device
    model = models.build(a.arch, classes, "none", crop=a.crop, keyed_drop=False).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                                **({"fused": True} if cuda else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=a.amp == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    forward = torch.compile(model, mode=a.compile_mode) if a.compile else model
    model.train()

    def step():
        with engine.autocast(device, a.amp):
            loss = criterion(models.logits(forward(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss
    return step


def step_name(flags: argparse.Namespace) -> str:
    """What a step does beyond forward and backward, e.g. "AdamW + clipping + EMA"."""
    parts = ["AdamW" if flags.opt == "adamw" else "SGD"]
    parts += [name for name, on in (("layer decay", flags.layer_decay), ("clipping", flags.clip_grad_norm),
                                    ("EMA", flags.model_ema)) if on]
    return " + ".join(parts)


def synthetic_mixed(batch, extra: augment.Extra, crop: int, classes: int):
    """The synthetic batch mixed, every step, with itself rolled by one by the mixing rows of samples 0..n-1."""
    images, labels = batch.images, batch.labels
    rows = torch.stack([augment.mix_params(0, 0, i, len(labels), crop, extra)[1] for i in range(len(labels))])
    rows = rows.to(images.device)
    while True:
        mixed, targets = augment.mix(images, labels, images.roll(1, 0), labels.roll(1, 0), rows, classes)
        yield Batch(mixed, targets)


class _AllEpochs:
    """A loader's epochs 0, 1, 2, ... as one loader for DeviceBatches: one producer throughout (CachedBatches'), where
    a new iteration per epoch would time a cold start (its first batch gathered while the GPU waits) at every
    boundary."""

    def __init__(self, loader):
        self.loader, self.dataset = loader, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return self.loader.epochs(0) if hasattr(self.loader, "epochs") else endless(self.loader)


def _endless_device(loader, device):
    return iter(engine.DeviceBatches(_AllEpochs(loader), device))


def step_flops(model, a, device, criterion) -> float:
    """FLOPs of one training step (forward + backward), counted on a copy of the model (`flop_counter`)."""
    probe = copy.deepcopy(model)
    x = torch.zeros((a.batch_size, 3, a.crop, a.crop), device=device)
    y = torch.zeros(a.batch_size, dtype=torch.long, device=device)
    counter = flop_counter()
    keys = torch.zeros(a.batch_size, dtype=torch.int64, device=device)  # masks for a model with dropout
    with counter, engine.autocast(device, a.amp), drop.keyed(probe, keys):
        criterion(models.logits(probe(x)), y).backward()
    del probe
    return float(counter.get_total_flops())


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with the convolution backward counted right: torch's formula takes a grouped
    convolution's weight gradient as an ungrouped one (x groups: ConvNeXt-T at 448 px counted at 309.9 GFLOP an image
    instead of 106.9, depthwise layers at up to 1000x). Each gradient, of the input and of the weight, is one pass
    over the same multiply-adds as the forward."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)  # w_shape holds C_in / groups already
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def prep_cost(loader, device, step_seconds: float) -> dict:
    """Device time of crop/flip/normalize per batch (from batches already on the device), and its share of a step."""
    batches = [b.to(device) for b, _ in zip(loader, range(3))]  # CachedBatches': uncropped, with crop params
    ds = loader.dataset

    def prep(b):
        x = augment.crop_flip_batch(b.images, b.params, ds.crop, ds.padding)
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        return augment.normalize(x, ds.normalization).contiguous(memory_format=layout)
    for b in batches:
        prep(b)
    _sync(device)
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        for b in batches:
            prep(b)
    _sync(device)
    ms = 1000 * (time.perf_counter() - start) / (reps * len(batches))
    return {"prep_ms_per_batch": ms, "prep_fraction_of_step": ms / 1000 / step_seconds}


def _peak(a, device) -> tuple[float | None, str]:
    if a.peak_tflops:
        return a.peak_tflops, "--peak-tflops"
    if device.type != "cuda" or a.amp == "off":
        return None, "none"
    return peak_of(torch.cuda.get_device_name(device))


def peak_of(name: str) -> tuple[float | None, str]:
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value, f"{key} dense 16-bit spec"
    return None, "none"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({data.usable_cpus()} cores)"


def _data_root(path: str | None) -> Path:
    if not path:
        raise FgicError("-d PATH is required (a folder with train/ and test/; --make-data DIR writes one)")
    root = Path(path)
    if not root.is_dir():
        raise FgicError(f"-d {path}: no such folder (python -m fgic.bench loader --make-data {path} writes one)")
    data.check_layout(root)
    return root


def _table(rows) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'pipeline':<{width}}  {'images/s':>10}")
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>10.0f}")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fgic.bench", description="Throughput benchmarks of fgic (see BENCHMARKS.md).")
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-d", "--data", metavar="PATH", help="a dataset folder with train/ and test/")
    common.add_argument("-w", "--workers", type=int, default=data.default_workers(1),
                        help="loader workers (default: from the CPUs, at most 8)")
    common.add_argument("--resize", type=int, default=RECIPE["resize"], help="resize to N x N (default: the recipe's)")
    common.add_argument("--crop", type=int, default=RECIPE["crop"], help="crop size (default: the recipe's)")
    common.add_argument("--padding", type=int, default=RECIPE["padding"], help="padding before the crop (default: the "
                                                                             "recipe's)")
    common.add_argument("--cache-dir", help="where fgic's cache lives (default as in fgic.ddp)")
    common.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    common.add_argument("--recipe", default="seed", choices=tuple(config.RECIPES),
                        help="time fgic.ddp's preset: its augmentation, and its optimizer step in train (default seed)")
    lo = sub.add_parser("loader", parents=[common], help="host-side images/s: the recipe's pipeline beside fgic's")
    lo.add_argument("-b", "--batch-size", type=int, default=RECIPE["batch_size"], help="batch (default: the recipe's)")
    lo.add_argument("--batches", type=int, default=40, help="batches timed (default 40)")
    lo.add_argument("--warmup", type=int, default=5, help="batches before timing (default 5)")
    lo.add_argument("--make-data", metavar="DIR", help="write a dataset of 500x375 JPEGs to DIR and stop")
    lo.add_argument("--images", type=int, default=1024, help="with --make-data: training images (default 1024)")
    tr = sub.add_parser("train", parents=[common], help="training images/s and the share of the FLOP ceiling")
    tr.add_argument("--synthetic", action="store_true", help="one random batch kept on the device (no loader)")
    tr.add_argument("--pipeline", choices=("fgic", "original"), default="fgic", help="with -d: which loader feeds")
    tr.add_argument("--arch", default=RECIPE["arch"], help="torchvision model or timm:NAME (default: the recipe's)")
    tr.add_argument("-a", "--amp", default="bf16", choices=config.AMP_MODES, help="autocast (default bf16)")
    tr.add_argument("-b", "--batch-size", type=int, default=128, help="batch (default 128)")
    tr.add_argument("--steps", type=int, default=30, help="steps timed (default 30)")
    tr.add_argument("--warmup", type=int, default=10, help="steps before timing, at least 1 (default 10)")
    tr.add_argument("--num-classes", type=int, default=200, help="with --synthetic (default 200, CUB's)")
    tr.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    tr.add_argument("--compile", action="store_true", help="compile the step as fgic.ddp --compile does (the model "
                                                              "with its loss); a failed compile is an error "
                                                              "here, not an eager figure")
    tr.add_argument("--compile-mode", default="default", choices=config.COMPILE_MODES,
                    help="torch.compile's mode with --compile (default default)")
    tr.add_argument("--sync-bn", action="store_true", help="fgic.ddp's synchronised BatchNorm of several processes, on "
                                                            "a process group of one (its cost beside plain BatchNorm)")
    tr.add_argument("--no-batchnorm", action="store_true", help="BatchNorm layers removed: what the normalisation "
                                                                 "costs (a bound, not a recipe)")
    tr.add_argument("--reference", action="store_true", help="also time a plain PyTorch step on the same device and "
                                                              "batch; adds reference_images_per_second and "
                                                              "reference_ratio (fgic / reference)")
    tr.add_argument("--peak-tflops", type=float, help="the device's 16-bit ceiling (default: a table by GPU name)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = get_parser().parse_args(argv)
    for flag in ("workers", "batch_size", "batches", "warmup", "steps", "images"):
        value = getattr(a, flag, None)
        if value is not None and value < (0 if flag in ("workers", "warmup") else 1):
            raise FgicError(f"--{flag.replace('_', '-')} {value}: too small")
    if a.cmd == "train" and a.warmup < 1:
        raise FgicError(f"--warmup {a.warmup}: train needs at least 1 warm-up step (the first step loads the kernels, "
                        f"and on a GPU cuDNN tries its algorithms: timing it would not measure throughput)")
    config.check_sizes(a.resize, a.crop, a.padding)
    try:
        result = loader_cmd(a) if a.cmd == "loader" else train_cmd(a)
    finally:
        if torch.distributed.is_initialized():  # --sync-bn's
            torch.distributed.destroy_process_group()
    if a.json and result:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"fgic.bench: wrote {a.json}")
    return 0


def cli() -> None:
    run_cli(main, "fgic.bench")


if __name__ == "__main__":
    cli()
