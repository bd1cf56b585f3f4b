"""The training step and the exact evaluation: one epoch of each, with totals summed over all processes."""
from __future__ import annotations

import time
from collections import Counter
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fgic import augment, drop
from fgic.batch import Batch
from fgic.dist import Dist
from fgic.errors import FgicError
from fgic.models import logits
from fgic.progress import progress

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp in AMP_DTYPES else nullcontext()


def resolve_amp(amp: str, device: torch.device) -> str:
    """-a auto for this device: bf16 on a GPU that has it, fp16 (with the GradScaler) on one without, off on the CPU
    (whose records stay the seed's float32). NVIDIA's ResNet-50 tables put 16-bit training at 2.1-2.6x float32/TF32;
    fp16 where bf16 is missing (V100, T4) is their own mixed-precision recipe."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "off"
    return "bf16" if has_bf16(device) else "fp16"


def has_bf16(device: torch.device) -> bool:
    """Whether a CUDA device computes in bfloat16 natively: compute capability 8.0 or later, or ROCm.
    torch.cuda.is_bf16_supported() also says yes for a V100 or T4, where bfloat16 is emulated (including_emulation
    defaults to True), and is asked of the current device, not this one."""
    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def check_amp(amp: str, device: torch.device) -> None:
    if amp == "bf16" and device.type == "cuda" and not has_bf16(device):
        raise FgicError(f"-a/--amp bf16: {torch.cuda.get_device_name(device)} has no native bfloat16 (compute "
                        f"capability 8.0 or later); use -a fp16")


def inputs(loader, batch: Batch, device: torch.device) -> Batch:
    """A loader batch -> Batch(normalised float images, labels, drop keys) on the device: the dataset moves and crops
    it there (the host moves uint8 bytes only), and mixes each image with its partner (the labels are then class
    probabilities); channels_last on a GPU. Test batches have no drop keys (None)."""
    moved, norm = loader.dataset.to_device(batch, device), loader.dataset.normalization
    images, labels = augment.normalize(moved.images, norm), moved.labels
    if moved.partners is not None:
        images, labels = augment.mix(images, labels, augment.normalize(moved.partners, norm), moved.partner_labels,
                                     moved.mix_rows, len(loader.dataset.classes))
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # the CPU: as uncached
    return Batch(images.contiguous(memory_format=layout), labels, moved.keys)


class DeviceBatches:
    """A loader's batches as Batch(normalised images, labels, drop keys) on the device (see `inputs`). On a GPU the next
    batch is copied, cropped and normalised on a side stream while the current one trains, so the step never waits
    for it."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self.loader:
                yield inputs(self.loader, batch, self.device)
            return
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        pending = None
        for batch in self.loader:
            with torch.cuda.stream(side):
                ready = inputs(self.loader, batch, self.device)
                done = torch.cuda.Event()
                done.record(side)
            if pending is not None:
                yield self._hand_over(pending, main)
            pending = ready, done
        if pending is not None:
            yield self._hand_over(pending, main)

    @staticmethod
    def _hand_over(pending, main) -> Batch:
        batch, done = pending
        main.wait_event(done)
        for t in batch:
            if t is not None:
                t.record_stream(main)  # made on the side stream, used on the main one
        return batch


class WithLoss(nn.Module):
    """A model and its loss as one module, `(images, labels) -> (loss, logits)`: what --compile compiles (under DDP
    too), so that the loss is traced into the model's graph and its backward."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        out = logits(self.model(images))
        return self.criterion(out, labels), out


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's and DDP's wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def forward(model: nn.Module, images, labels, criterion, device: torch.device, amp: str,
            keys: torch.Tensor | None = None):
    """The training forward of one batch: (loss, logits), still on the device. `model` is a model or a WithLoss (then
    `criterion` is its own). `labels` are class indices or, mixed, class probabilities; `keys` the samples' drop keys,
    for a model with stochastic depth or dropout. A run then steps with `opt.step(loss)` (optim.Optimization)."""
    with autocast(device, amp), drop.keyed(model, keys):
        if isinstance(unwrapped(model), WithLoss):
            return model(images, labels)
        out = logits(model(images))
        return criterion(out, labels), out


class EpochResult(NamedTuple):
    """What `train_one_epoch` returns, done or stopped. `stopped_at`: None when the epoch ran to its end, else the
    steps done when a stop came. `totals`: this rank's running (loss sum, correct, images), unreduced, for a stop's
    checkpoint. `metrics`: at the end, unprefixed and summed over the ranks (loss, acc, images, seconds,
    images_per_second); empty after a stop."""
    stopped_at: int | None
    totals: list[float]
    metrics: dict


def train_one_epoch(model: nn.Module, loader, opt, criterion, dist: Dist, amp: str, desc: str, start_step: int = 0,
                    totals: list[float] | None = None, stop=None, later_steps: int = 0) -> EpochResult:
    """One pass over this process's share of every global batch, from `start_step` on (resuming inside an epoch,
    with this rank's running `totals` from the checkpoint), stepping `opt` (an optim.Optimization). Loss and
    accuracy (of mixed samples: against the larger share's class) accumulate on the device.

    `stop(step)` is asked after each step; when it returns True (every rank gets the same answer) the epoch ends
    early, its result `stopped_at` that step. `later_steps`: the run's steps after this epoch, for the progress's ETA
    of the run."""
    model.train()
    device = dist.device
    local = torch.tensor(totals or [0.0, 0.0, 0.0], dtype=torch.float64, device=device)  # loss sum, correct, images
    images_before = float(totals[2]) if totals else 0.0
    start = time.perf_counter()
    bar = progress(DeviceBatches(loader, device), dist.is_main, desc, later_steps, loader.batch_size * dist.world_size,
                   done=start_step)
    step = start_step
    shown = start
    for step, batch in enumerate(bar, start=start_step + 1):
        images, labels, keys = batch.images, batch.labels, batch.keys
        loss, out = forward(model, images, labels, criterion, device, amp, keys)
        opt.step(loss)
        n = len(labels)  # no host sync in the step: the totals stay on the device until read
        local[0] += loss.detach().double() * n
        local[1] += (out.argmax(1) == (labels if labels.dim() == 1 else labels.argmax(1))).sum()
        local[2] += n
        if dist.is_main and time.perf_counter() - shown >= bar.mininterval:  # when the bar redraws, not every step
            shown = time.perf_counter()
            bar.set_postfix(loss=f"{local[0].item() / max(local[2].item(), 1):.3f}", refresh=False)
        if stop is not None and step < start_step + len(loader) and stop(step):
            bar.close()
            return EpochResult(step, local.tolist(), {})
    seconds = time.perf_counter() - start
    mine = local.tolist()
    images_now = mine[2] - images_before
    loss_sum, correct, count = dist.all_reduce_sum(local.clone()).tolist()
    return EpochResult(None, mine, {
        "loss": loss_sum / max(count, 1), "acc": 100.0 * correct / max(count, 1), "images": int(count),
        "seconds": seconds, "images_per_second": images_now * dist.world_size / seconds if seconds > 0 else 0.0})


@torch.inference_mode()
def evaluate(model: nn.Module, loader, criterion, dist: Dist, amp: str, num_classes: int, desc: str = "test",
             confusion: bool = False) -> dict:
    """Exact top-1/top-5 over the test set: each process scores its own shard (no padded duplicates) and the
    counts are summed. Pass the bare model, not the DDP wrapper: evaluation needs no collective per batch, so a
    process with fewer or no batches cannot stall the others. With `confusion`, also `confusion_pairs`: (true class,
    predicted class, count) of each mistake made, most first (the diagonal is class_correct), taking memory in the
    test images, not the classes squared."""
    model.eval()
    device = dist.device
    k = min(5, num_classes)
    n = num_classes
    totals = torch.zeros(3 + 2 * n, dtype=torch.float64, device=device)
    # loss sum, top-1 correct, top-k correct, then per-class correct and per-class total
    cells = []  # with `confusion`: true * n + predicted of each test image of this process
    for batch in progress(DeviceBatches(loader, device), dist.is_main, desc):
        images, labels = batch.images, batch.labels
        with autocast(device, amp):
            out = logits(model(images))
        loss = nn.functional.cross_entropy(out.float(), labels, reduction="sum",
                                           label_smoothing=criterion.label_smoothing)
        hit1 = out.argmax(1) == labels
        hitk = (out.topk(k, dim=1).indices == labels[:, None]).any(1)
        totals[0] += loss.double()
        totals[1] += hit1.sum()
        totals[2] += hitk.sum()
        # per-class counts by index_add_: labels[hit1] and CUDA's bincount wait for the GPU (an output size to learn)
        totals[3:3 + num_classes].index_add_(0, labels, hit1.double())
        ones = torch.ones_like(labels, dtype=torch.float64)
        totals[3 + n:3 + 2 * n].index_add_(0, labels, ones)
        if confusion:
            cells.append(labels * n + out.argmax(1))
    dist.all_reduce_sum(totals)
    loss_sum, correct, correct_k = totals[:3].tolist()
    class_correct = totals[3:3 + n].long().tolist()
    class_total = totals[3 + n:3 + 2 * n].long().tolist()
    total = sum(class_total)
    result = {"loss": loss_sum / max(total, 1), "acc": 100.0 * correct / max(total, 1),
              "top5": 100.0 * correct_k / max(total, 1), "correct": int(correct), "total": total,
              "class_correct": class_correct, "class_total": class_total}
    if confusion:
        result["confusion_pairs"] = confused_pairs(cells, n, dist)
    return result


def confused_pairs(cells: list[torch.Tensor], n: int, dist: Dist) -> list[tuple[int, int, int]]:
    """(true, predicted, count) of the off-diagonal cells (true * n + predicted) counted on every process, summed
    over them, most first."""
    mine = []
    if cells:
        found = torch.cat(cells)
        found, counts = torch.unique(found[found // n != found % n], return_counts=True)
        mine = list(zip(found.tolist(), counts.tolist()))
    total = Counter()
    for part in dist.gather(mine):
        for cell, count in part:
            total[cell] += count
    return sorted(((cell // n, cell % n, count) for cell, count in total.items()), key=lambda c: (-c[2], c[0], c[1]))
