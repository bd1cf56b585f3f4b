"""Run by tests/test_arch_sweep.py under `torchrun --nproc_per_node=2` (gloo, CPU), or as one process: every arch named
on the command line goes through fgic's own code (the input check, models.build, the CPU BatchNorm of several processes
and DDP where there are several, optim.sgd and two tests.helpers.train_step steps on random images) at the smallest
crop from 64 px up that it takes. Rank 0 appends one JSON line per arch to OUT.

usage: torchrun --standalone --nproc_per_node=2 tests/arch_harness.py OUT ARCH...
       python tests/arch_harness.py OUT ARCH...
"""
from __future__ import annotations

import json
import resource
import sys
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fgic import augment, cluster, models, optim
from fgic.dist import Dist
from fgic.errors import FgicError
from tests.helpers import train_step

SMALL_CROP = 64  # as the tiny CPU runs of the other tests (see tests/helpers.py TINY)
CLASSES = 3
BATCH = 2  # per process: BatchNorm sees 4 values per channel at a 1x1 map
LR = 0.1


def checksums(model: nn.Module) -> list[tuple[int, float]]:
    """Each parameter's float32 bit patterns summed as int32 (wrapping: exact modular arithmetic) and its float64 sum
    (no float64 copy): equal tensors give equal pairs. A change escapes the first only when the bit deltas cancel, as
    in LayerNorm weights of 1.0 of which one went up 1 ulp and one down 1 ulp (1 ulp below 1.0 is half as large),
    where the float64 sum moves; it escapes the second when one went up 1 ulp and two down, where the first moves.
    Comparing the tensors would need a copy of the largest models (2.6 GB); float64 copies took 41 ms a million
    parameters on this machine's CPU, these 5 ms (2 x 5.4 G parameters in the sweep)."""
    return [(int(p.detach().view(torch.int32).sum(dtype=torch.int32)), float(p.detach().sum(dtype=torch.float64)))
            for p in model.parameters()]


def moves(weight: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether plain SGD's update changes any element of the weight in float32."""
    return bool((weight - LR * grad).ne(weight).any())


def peak_gb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train_two_steps(dist: Dist, arch: str, crop: int) -> dict:
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = models.sync_batchnorm(models.build(arch, CLASSES, "none", crop=crop), cpu, distributed=dist.distributed)
    # as fgic.ddp makes it on the CPU: DDP over several processes, the module itself on one
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True) if dist.distributed else model
    # no weight decay: only a gradient moves a weight; no momentum: its buffers would add 2.4 GB a process for the
    # largest models, beyond what 2 of them fit in on a 24 GB machine
    optimizer = optim.sgd(model.parameters(), cpu, lr=LR, momentum=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = nn.CrossEntropyLoss()
    before = checksums(model)
    images = torch.Generator().manual_seed(dist.rank)
    losses = []
    model.train()
    for _ in range(2):
        batch = augment.normalize(torch.randint(0, 256, (BATCH, 3, crop, crop), dtype=torch.uint8, generator=images),
                                  augment.IMAGENET)
        labels = torch.randint(0, CLASSES, (BATCH,), generator=images)
        keys = torch.randint(0, 2 ** 32, (BATCH,), generator=images)  # the samples' drop keys
        loss, out = train_step(ddp, batch, labels, optimizer, scaler, criterion, cpu, "off", keys=keys)
        assert out.shape == (BATCH, CLASSES), out.shape
        losses.append(loss.item())
    after = checksums(model)
    named = list(model.named_parameters())
    unchanged = [(n, p) for (n, p), b, a in zip(named, before, after) if b == a]
    ranks = dist.gather(after)
    del ddp  # before the next arch (and before the process group goes, see Dist.close)
    return {"losses": losses, "parameters": len(named), "numel": sum(p.numel() for _, p in named),
            "same_on_ranks": all(r == ranks[0] for r in ranks),
            "no_grad": [n for n, p in named if p.grad is None],
            # unchanged, though lr x gradient would move it. Unchanged and rightly so: a zero gradient (a block that
            # stochastic depth dropped for the whole batch: swin_b, efficientnet_v2_m), or an update below float32's
            # resolution at the weight's size (convnext's LayerNorm weights of 1.0 behind a layer scale of 1e-6)
            "stuck": [n for n, p in unchanged if p.grad is not None and moves(p.detach(), p.grad)],
            "unchanged": [n for n, _ in unchanged]}


def main(out: str, archs: list[str]) -> None:
    dist = Dist.start(cluster.detect(), torch.device("cpu"))
    try:
        for arch in archs:
            start = time.perf_counter()
            refused, crop = None, SMALL_CROP
            try:
                models.check_input(arch, SMALL_CROP)
            except FgicError as exc:
                refused = str(exc)
                crop = models.nearest_crops(arch, SMALL_CROP)[1]
            probe_s = time.perf_counter() - start
            if dist.is_main:
                print(f"arch_harness: {arch} at {crop} px", file=sys.stderr, flush=True)
            result = {"arch": arch, "refused_at_64": refused, "crop": crop, "probe_s": probe_s}
            if crop is not None:
                result.update(train_two_steps(dist, arch, crop))
            result.update(seconds=time.perf_counter() - start, peak_gb=dist.gather(peak_gb()))
            if dist.is_main:
                with open(out, "a") as f:
                    f.write(json.dumps(result) + "\n")
    finally:
        dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
