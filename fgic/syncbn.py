"""Cross-process synchronized BatchNorm that works on any backend (gloo on CPU included)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fgic.errors import FgicError


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce(SUM).

    Every rank's output is the global sum, so every rank's input contributes to every
    rank's loss: the gradient w.r.t. the local input is the sum of all ranks' output
    gradients, i.e. the backward is an all-reduce(SUM) as well.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group=None) -> torch.Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _identity(x: torch.Tensor, group=None) -> torch.Tensor:
    return x


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``x`` over all ranks of ``group`` (default: world), differentiably."""
    return _AllReduceSum.apply(x, group)


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, ...) inputs whose training statistics span all ranks.

    Same semantics as ``torch.nn.SyncBatchNorm`` (and as ``nn.BatchNorm*d`` run on the
    concatenated global batch), built from plain ``dist.all_reduce`` calls so it runs on
    any backend. In eval mode it is exactly ``nn.BatchNorm*d``; training on one process runs
    the same arithmetic without the all-reduces. Parameters and buffers are those of
    ``_BatchNorm``, so state_dicts are interchangeable with ``nn.BatchNorm*d``.
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

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:  # running statistics: nothing to synchronise
            return super().forward(input)
        # One process runs the same arithmetic with the reductions skipped, so 1 and N processes differ only in
        # how float sums are grouped.
        reduce = all_reduce_sum if self._distributed() else _identity
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

        # Pass 1: global mean. The local element count rides along in the same all-reduce
        # (ranks may hold different batch sizes, e.g. an empty or short last batch).
        count = x.new_full((1,), input.numel() // c)
        stats = reduce(torch.cat([x.sum(dims), count]), self.process_group)
        n = round(stats[c].item())
        if n <= 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got global count {n} (local input size {tuple(input.shape)})")
        mean = stats[:c] / n
        # Pass 2: global biased variance from centered values (numerically stable).
        xc = x - mean.view(shape)
        var = reduce((xc * xc).sum(dims), self.process_group) / n

        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(x.dtype)
        out = xc * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype).view(shape)

        # Running statistics: same update rule as _BatchNorm, unbiased var over the GLOBAL count.
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            with torch.no_grad():
                rm, rv = self.running_mean, self.running_var
                rm.mul_(1 - factor).add_(mean.detach().to(rm.dtype), alpha=factor)
                rv.mul_(1 - factor).add_((var.detach() * (n / (n - 1))).to(rv.dtype), alpha=factor)
        return out.to(input.dtype)


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


def convert_sync_batchnorm(module: nn.Module, device_type: str, process_group=None) -> nn.Module:
    """Make every BatchNorm in ``module`` synchronize its batch statistics across ranks.

    ``device_type == "cuda"`` uses ``nn.SyncBatchNorm`` (timm's converter where timm's BatchNormAct2d is in the
    model); any other device type gets ``AllReduceBatchNorm`` (``AllReduceBatchNormAct``). Parameters and buffers
    are shared with the originals and train/eval mode is kept. Like torch's converter, children are replaced in
    place and the (possibly new) root module is returned.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and not isinstance(m, AllReduceBatchNorm)]
    unknown = [type(m).__name__ for m in norms if type(m) not in TORCH_BATCHNORMS and not norm_act(m)]
    if unknown:  # a subclass's own forward would be lost
        raise FgicError(f"{unknown[0]}: a BatchNorm subclass fgic cannot synchronise across processes; train it on "
                        f"one process or pick another --arch")
    if device_type == "cuda" and any(map(norm_act, norms)):
        # timm's modules come from a model timm built, so timm is installed; its converter keeps their activations
        from timm.layers import convert_sync_batchnorm as timm_convert  # noqa: PLC0415
        return timm_convert(module, process_group)
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return all_reduce_norms(module, process_group)


def all_reduce_norms(module: nn.Module, process_group=None) -> nn.Module:
    """The CPU (any backend) conversion of convert_sync_batchnorm."""
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
