"""Cross-process synchronized BatchNorm for any backend (gloo on the CPU, NCCL on GPUs): one collective per layer
forward and one backward, no host sync, traceable by torch.compile."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fgic.errors import FgicError

# torch's functional collectives as ops (torch >= 2.3): eager runs them as they are, and dynamo traces them into the
# graph (dist.all_gather_into_tensor there is a graph break). wait_tensor waits on the device's stream, not the host.
_c10d = torch.ops._c10d_functional


class _AllGather(torch.autograd.Function):
    """Every rank's (K,) vector stacked into (world, K). Every rank's output feeds every rank's loss, so the
    gradient w.r.t. the local vector is the sum over ranks of their output gradients' row of this rank: one
    all-reduce of the (world, K) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str, rank: int, world: int) -> torch.Tensor:
        ctx.group_name, ctx.rank = group_name, rank
        out = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), world, group_name))
        return out.view(world, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = _c10d.wait_tensor(_c10d.all_reduce(grad.contiguous(), "sum", ctx.group_name))
        return grad[ctx.rank], None, None, None


def all_gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """The (K,) vector ``x`` of every rank of ``group`` (default: world) as the rows of a (world, K) tensor,
    differentiably."""
    group = group or dist.group.WORLD
    return _AllGather.apply(x, group.group_name, dist.get_rank(group), dist.get_world_size(group))


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, ...) inputs whose training statistics span all ranks.

    Same semantics as ``torch.nn.SyncBatchNorm`` (and as ``nn.BatchNorm*d`` run on the concatenated global batch),
    without its host syncs and graph breaks (pytorch#161302): each rank gathers every rank's count, sum and sum of
    squared deviations from its own mean (one all_gather of 2C + 1 values per layer) and combines them with Chan's
    formula, which cancels nothing (a sum of squares about zero would); the backward is one all-reduce. Ranks may
    hold different batch sizes, an empty one included. In eval mode it is exactly ``nn.BatchNorm*d``; training on one
    process runs the same arithmetic without the combination. Parameters and buffers are those of ``_BatchNorm``, so
    state_dicts are interchangeable with ``nn.BatchNorm*d``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D input")

    def synchronises(self) -> bool:
        """Whether to synchronise: over more than one rank, or over a process group named even if it has one rank
        (the combination then changes nothing but the arithmetic's path)."""
        return dist.is_available() and dist.is_initialized() and (
            self.process_group is not None or dist.get_world_size() > 1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:  # running statistics: nothing to synchronise
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        if c != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got input of shape {tuple(input.shape)}")
        dims = [0, *range(2, input.dim())]           # every dim but the channel dim
        shape = [1, c] + [1] * (input.dim() - 2)      # broadcast a (C,) vector over input
        # Compute in float64 on the CPU, as torch's own CPU BatchNorm kernels accumulate in double: the backward
        # through the mean and variance cancels large terms, and float32 sums there cost ~1e-3 relative error in
        # the first layers' gradients (measured on resnet18 with real images). Elsewhere at least float32.
        x = input.double() if input.device.type == "cpu" else input.to(torch.promote_types(input.dtype, torch.float32))

        count = input.numel() // c  # known from the shape: no host sync
        total = x.sum(dims)
        mean = total / max(count, 1)
        xc = x - mean.view(shape)
        m2 = (xc * xc).sum(dims)  # squared deviations from the mean, local so far
        n = count
        if self.synchronises():
            n, mean, m2 = self._combine(total, m2, count)
            xc = x - mean.view(shape)
        if count <= 1 and n <= 1:  # a global count is read (a host sync) only where the local one is this small
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got global count {int(n)} (local input size {tuple(input.shape)})")
        var = m2 / n  # biased

        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(x.dtype)
        out = xc * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype).view(shape)

        # Running statistics: same update rule as _BatchNorm, unbiased var over the GLOBAL count.
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            with torch.no_grad():
                rm, rv = self.running_mean, self.running_var
                new_mean, new_var = mean.detach().to(rm.dtype), (var.detach() * (n / (n - 1))).to(rv.dtype)
                if self.momentum is None:  # cumulative moving average; a tensor factor (float() syncs the host)
                    factor = 1.0 / self.num_batches_tracked
                    rm.mul_(1 - factor).add_(new_mean * factor)
                    rv.mul_(1 - factor).add_(new_var * factor)
                else:
                    rm.mul_(1 - self.momentum).add_(new_mean, alpha=self.momentum)
                    rv.mul_(1 - self.momentum).add_(new_var, alpha=self.momentum)
        return out.to(input.dtype)

    def _combine(self, total: torch.Tensor, m2: torch.Tensor, count: int):
        """(global count, mean, sum of squared deviations) from this rank's sum, m2 and count and every other
        rank's: Chan et al.'s pairwise formula, M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2, all ranks at once."""
        c = total.numel()
        rows = all_gather_rows(torch.cat([total, m2, total.new_full((1,), count)]), self.process_group)
        counts = rows[:, 2 * c:]                       # (world, 1)
        n = counts.sum()
        mean = rows[:, :c].sum(0) / n
        means = rows[:, :c] / counts.clamp(min=1)      # an empty rank's sum is 0 and its weight 0
        m2 = rows[:, c:2 * c].sum(0) + (counts * (means - mean) ** 2).sum(0)
        return n, mean, m2


class AllReduceBatchNormAct(AllReduceBatchNorm):
    """AllReduceBatchNorm, then the dropout and activation of timm's BatchNormAct2d (its children `drop` and `act`,
    which the conversion carries over): timm's EfficientNets and NFNets norm and activate in one module, and a plain
    BatchNorm in its place would silently drop the activation."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))


TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def norm_act(module: nn.Module) -> bool:
    """Whether a BatchNorm subclass is timm's norm + activation kind (BatchNormAct2d: `drop` and `act` after it)."""
    return type(module) not in TORCH_BATCHNORMS and hasattr(module, "act") and hasattr(module, "drop")


def convert_sync_batchnorm(module: nn.Module, device_type: str | None = None, process_group=None) -> nn.Module:
    """Make every BatchNorm in ``module`` synchronize its batch statistics across ranks: ``AllReduceBatchNorm``
    (``AllReduceBatchNormAct`` for timm's BatchNormAct2d) on every device type, CUDA included, where torch's
    SyncBatchNorm syncs the host in each layer (``device_type`` is no longer consulted). Parameters and buffers are
    shared with the originals and train/eval mode is kept. Like torch's converter, children are replaced in place
    and the (possibly new) root module is returned.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and not isinstance(m, AllReduceBatchNorm)]
    unknown = [type(m).__name__ for m in norms if type(m) not in TORCH_BATCHNORMS and not norm_act(m)]
    if unknown:  # a subclass's own forward would be lost
        raise FgicError(f"{unknown[0]}: a BatchNorm subclass fgic cannot synchronise across processes; train it on "
                        f"one process or pick another --arch")
    return all_reduce_norms(module, process_group)


def all_reduce_norms(module: nn.Module, process_group=None) -> nn.Module:
    """The conversion of convert_sync_batchnorm, unchecked."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        kind = AllReduceBatchNormAct if norm_act(module) else AllReduceBatchNorm
        out = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                   process_group)
        # Share the tensors themselves (requires_grad, device and dtype come along).
        for name in ("weight", "bias"):
            setattr(out, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(out, name, getattr(module, name))
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, all_reduce_norms(child, process_group))
    return out
