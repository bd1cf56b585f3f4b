"""The optimisation of a run: SGD or AdamW over parameter groups (norm and layer decay), the lr schedule, gradient
clipping and the EMA of the weights (`Optimization`)."""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision import models

from fgic import config, timm_models
from fgic.errors import FgicError
from fgic.syncbn import AllReduceBatchNorm

NORM_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, nn.RMSNorm,
                AllReduceBatchNorm)
# timm's own norm layers that subclass none of torch's (RmsNorm, RmsNorm2d, SimpleNorm, EvoNorm, FilterResponseNorm,
# FrozenBatchNormAct2d), by the modules timm defines them in
TIMM_NORM_MODULES = ("timm.layers.norm", "timm.layers.norm_act", "timm.layers.evo_norm",
                     "timm.layers.filter_response_norm", "timm.layers.split_batchnorm")


# torchvision's blocks, a layer each: an arch with none (AlexNet, VGG, SqueezeNet, DenseNet, GoogLeNet, Inception v3)
# has no chain of blocks whose numbering means a depth. RegNet's stages and MaxViT's are modules holding blocks, not
# blocks (counting them with their blocks gave RegNet's new head 0.0016 x the lr at --layer-decay 0.65)
BLOCK_CLASSES = (models.vision_transformer.EncoderBlock, models.swin_transformer.SwinTransformerBlock,
                 models.convnext.CNBlock, models.efficientnet.MBConv, models.efficientnet.FusedMBConv,
                 models.mobilenetv2.InvertedResidual, models.mobilenetv3.InvertedResidual,
                 models.regnet.ResBottleneckBlock, models.resnet.BasicBlock, models.resnet.Bottleneck,
                 models.maxvit.MaxVitLayer, models.mnasnet._InvertedResidual, models.shufflenetv2.InvertedResidual)
FAMILIES = "ViT, Swin, ConvNeXt, EfficientNet, MobileNet, RegNet, ResNet, MaxViT, MNASNet, ShuffleNet, timm models"
# Under this share of the lr the stem is frozen in effect (1e-5 x AdamW's 1e-3 moves a weight 1e-4 in 10k steps).
# MAE's deepest recipe passes: ViT-H, 0.75 over 32 blocks, gives its stem 7.5e-5; 0.65, tuned for ViT-B's 12 blocks,
# would give efficientnet_v2_s's 40 blocks 2e-8 and resnet152's 50 blocks 3e-10.
FROZEN_SCALE = 1e-5
VIT_B_STEM_SCALE = 0.65 ** 13  # the transformer recipe's stem on ViT-B, which a deeper arch is offered instead


def blocks(model: nn.Module) -> list[str]:
    """The names of the model's blocks (BLOCK_CLASSES, none inside another) in forward order."""
    found: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, BLOCK_CLASSES) and not (found and name.startswith(f"{found[-1]}.")):
            found.append(name)
    return found


def layer_ids(model: nn.Module, arch: str) -> tuple[dict[str, int], int]:
    """Each parameter's layer: 0 before the first block, k + 1 in block k (between blocks: the next block's),
    L + 1 after the last (the head); and L. A timm model is numbered by its own group_matcher, as timm's layer
    decay does, with its classifier last."""
    if hasattr(model, "group_matcher"):
        return timm_layer_ids(model, arch)
    names = blocks(model)
    if not names:
        raise FgicError(f"--layer-decay: {arch} has no chain of blocks to number (supported: {FAMILIES}); give "
                        f"--layer-decay 1 (none) or leave it out")
    ids, seen = {}, 0  # seen: the id of the last block met
    for pname, _ in model.named_parameters():
        block = next((i for i, b in enumerate(names) if pname.startswith(f"{b}.")), None)
        if block is not None:
            seen = ids[pname] = block + 1
        else:
            ids[pname] = 0 if seen == 0 else seen + 1  # after the last block: len(names) + 1
    return ids, len(names)


def timm_layer_ids(model: nn.Module, arch: str) -> tuple[dict[str, int], int]:
    from timm.models import group_parameters  # noqa: PLC0415  (timm: an optional extra)
    ids = dict(group_parameters(model, model.group_matcher(coarse=False), reverse=True))
    top = max(ids.values(), default=0)  # timm's: what its matcher leaves unmatched (the head) is the last group
    heads = tuple(f"{h}." for h in timm_models.heads(model))
    ids.update({n: top for n in ids if n.startswith(heads)})
    if top < 2:
        raise FgicError(f"--layer-decay: {arch}'s group_matcher numbers no blocks; give --layer-decay 1 (none) or "
                        f"leave it out")
    return ids, top - 1


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_CLASSES) or type(module).__module__ in TIMM_NORM_MODULES


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None = None,
                 layer_decay: float | None = None, *, arch: str = "the model") -> list[dict]:
    """Parameter groups by (layer, decay); one group of all parameters when neither option is set (the seed's
    optimizer, exactly). Norm layers' parameters and biases take `norm_weight_decay` when given."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layer_decay == 1:  # every layer at the lr: nothing to number (a recipe's decay turned off, on any arch)
        layer_decay = None
    if norm_weight_decay is None and layer_decay is None:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay, "lr_scale": 1.0}]
    norms = {f"{m}.{n}" if m else n for m, mod in model.named_modules() if is_norm(mod)
             for n, _ in mod.named_parameters(recurse=False)}
    ids, layers = layer_ids(model, arch) if layer_decay is not None else ({}, 0)
    if layer_decay is not None and layer_decay ** (layers + 1) < FROZEN_SCALE:
        offer = math.ceil(VIT_B_STEM_SCALE ** (1 / (layers + 1)) * 100) / 100
        raise FgicError(f"--layer-decay {layer_decay:g}: over {arch}'s {layers} blocks it gives the stem "
                        f"{layer_decay ** (layers + 1):.1g} x the lr (under {FROZEN_SCALE:g}: frozen); --layer-decay "
                        f"{offer:g} gives it the {VIT_B_STEM_SCALE:.2g} that 0.65 gives ViT-B's 12 blocks")
    groups: dict[tuple, dict] = {}
    for name, p in params:
        plain = norm_weight_decay is not None and (name in norms or name.endswith("bias"))
        decay = norm_weight_decay if plain else weight_decay
        layer = ids.get(name, 0)
        scale = layer_decay ** (layers + 1 - layer) if layer_decay is not None else 1.0
        groups.setdefault((layer, decay), {"params": [], "weight_decay": decay, "lr_scale": scale})["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: k[0])]

def sgd(params, device: torch.device, *, fused: bool | None = None, **opts) -> torch.optim.SGD:
    """SGD with momentum; fused (torch >= 2.3 builds that have it) where `fused` says, by default on a GPU, else the
    foreach kernel there; the CPU keeps torch's default per-parameter loop.

    The momentum buffers exist, zeroed, before the first step. torch's fused SGD creates them with `empty_like` at
    its first step and leaves them so when the GradScaler skips that step (an fp16 overflow at the initial scale,
    common); the next step then applied the garbage (seen: 1e24 on the CPU, torch 2.14.1). A zero buffer gives
    0.9 * 0 + g = g, bitwise what SGD's own first step stores (dampening 0), on every kernel and torch version."""
    params = list(params)
    if fused is None:
        fused = device.type == "cuda"
    if fused:
        try:
            optimizer = torch.optim.SGD(params, fused=True, **opts)
        except (TypeError, RuntimeError):
            optimizer = torch.optim.SGD(params, foreach=device.type == "cuda", **opts)
    else:
        optimizer = torch.optim.SGD(params, fused=False, foreach=device.type == "cuda", **opts)
    if optimizer.defaults["momentum"] and optimizer.defaults["dampening"] == 0:
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def adamw(params, device: torch.device, **opts) -> torch.optim.AdamW:
    """AdamW at torch's betas and eps; fused on a GPU where the build has it. Its state is made at its first step,
    which a skipped fp16 step does not take (no garbage to inherit, unlike fused SGD's buffers)."""
    params = list(params)
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(params, fused=True, **opts)
        except (TypeError, RuntimeError):
            return torch.optim.AdamW(params, foreach=True, **opts)
    return torch.optim.AdamW(params, foreach=False, **opts)


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  clip_grad_norm: float | None = None) -> None:
    """The backward of `loss` and the optimizer's step through `scaler` (fp16's; a pass-through when disabled).
    Clipping acts on the gradient DDP has reduced, unscaled."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def warmup_cosine(epochs: int, steps_per_epoch: int, warmup_epochs: int, method: str, decay: float):
    """The lr factor after `step` optimizer steps: the warmup (linear from `decay` to 1, or `decay` throughout) over
    the first warmup_epochs, then a cosine to 0 over the rest, step by step (torchvision's LinearLR/ConstantLR then
    CosineAnnealingLR, per step rather than per epoch)."""
    warm, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return decay + (1 - decay) * step / warm if method == "linear" else decay
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
    return factor


EMA_PREFIX = "module."  # AveragedModel's state: the model's keys under its `module`


def ema_average(decay: float):
    """AveragedModel's multi_avg_fn: the EMA of the floating-point tensors, the integer ones (Swin's and MaxViT's
    relative_position_index, BatchNorm's num_batches_tracked) copied. torch's get_ema_multi_avg_fn averages those too,
    in float, and truncates: at decay 0.968 an index of 55 becomes 54 after one update, and the EMA model's attention
    reads other bias-table entries (swin_t: 996 of 28,812 index entries moved after two updates)."""
    lerp = get_ema_multi_avg_fn(decay)

    def update(ema: list[torch.Tensor], current: list[torch.Tensor], n_averaged) -> None:
        if ema[0].is_floating_point() or ema[0].is_complex():  # AveragedModel groups the tensors by dtype
            lerp(ema, current, n_averaged)
        else:
            for e, c in zip(ema, current):
                e.copy_(c)
    return update


def exact_buffers(state: dict, reference: dict, prefix: str = "") -> dict:
    """An EMA's state (keys `prefix` + the model's) with its integer tensors taken from `reference`, the model's
    state: they are never averaged (ema_average), and an EMA saved before that was so holds them truncated."""
    def exact(key: str, value):
        name = key[len(prefix):]
        integer = isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex())
        return reference[name] if integer and key.startswith(prefix) and name in reference else value
    return {k: exact(k, v) for k, v in state.items()}


def ema_decay(decay: float, batch_size: int, every: int, epochs: int) -> float:
    """torchvision's reference adjustment of --model-ema-decay to the global batch, the steps between updates and the
    epochs: the EMA's horizon is then epochs / ((1 - decay) x train images) epochs, whatever the batch."""
    return 1.0 - min(1.0, (1.0 - decay) * batch_size * every / epochs)


def ema_horizon_notice(args, steps_per_epoch: int, decay: float) -> str | None:
    """A line when the EMA's horizon, 1 / (1 - decay) updates at the adjusted decay, is longer than the updates the
    run makes after its warmup (the EMA restarts through it): the EMA then stays near its first weights (seen: digits,
    12 epochs of 252 steps at torchvision's default decay, EMA 10% = chance, the model 78%)."""
    updates = (args.epochs - args.lr_warmup_epochs) * steps_per_epoch // args.model_ema_steps
    horizon = 1 / (1 - decay) if decay < 1 else math.inf
    if horizon <= updates:
        return None
    # the --model-ema-decay whose adjusted horizon is a tenth of the run's updates (ema_decay solved for it)
    gap = float(f"{10 / max(updates, 1) * args.epochs / (args.batch_size * args.model_ema_steps):.0e}")
    fix = f"--model-ema-decay {1 - gap:g} gives a tenth of the run" if updates >= 10 and gap < 1 else \
        f"too few updates to average: leave --model-ema out{' or lower --model-ema-steps' * (args.model_ema_steps > 1)}"
    epochs = f"{args.epochs - args.lr_warmup_epochs} epochs after the warmup" if args.lr_warmup_epochs else \
        f"{args.epochs} epochs"
    return (f"fgic: notice: --model-ema: its horizon, {horizon:.0f} updates (--model-ema-decay {args.model_ema_decay:g}"
            f" adjusted to {decay:.6g}), is longer than the {updates} updates of this run ({epochs} x "
            f"{steps_per_epoch} steps / --model-ema-steps {args.model_ema_steps}), so the EMA stays near its first "
            f"weights; {fix}")


@dataclass
class Optimization:
    """A run's optimizer with what acts at its steps: the lr schedule (per step with a warmup, else the seed's cosine
    per epoch), the GradScaler, gradient clipping and the EMA of the weights of `model` (the bare module)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    per_step: bool
    scaler: torch.amp.GradScaler
    model: nn.Module
    clip_grad_norm: float | None = None
    ema: AveragedModel | None = None
    ema_every: int = 1
    warmup_steps: int = 0
    steps: int = 0  # optimizer steps taken in the run so far
    factor: Callable[[int], float] | None = None  # the per-step schedule's lr factor

    def lr_at(self, step: int) -> float:
        """The base lr after `step` steps of the run: metrics record an epoch's first, also when resumed inside it."""
        if self.factor is None:
            return self.lr
        group = self.optimizer.param_groups[0]
        return group["initial_lr"] * self.factor(step) / group.get("lr_scale", 1.0)  # as LambdaLR computes it

    @property
    def lr(self) -> float:
        """The base lr now (a layer-decayed group's lr over its scale)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def step(self, loss: torch.Tensor) -> None:
        """The backward of `loss` and one step of the run: through the GradScaler, clipped, then the schedule's step
        and the EMA's update."""
        backward_step(loss, self.optimizer, self.scaler, self.clip_grad_norm)
        self.after_step()

    def after_step(self) -> None:
        self.steps += 1
        if self.per_step:
            self.scheduler.step()
        if self.ema is not None and self.steps % self.ema_every == 0:
            if self.steps <= self.warmup_steps:  # torchvision's: during the warmup the EMA restarts from the weights
                self.ema.n_averaged.zero_()
            self.ema.update_parameters(self.model)

    def after_epoch(self) -> None:
        if not self.per_step:
            self.scheduler.step()

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict()}
        return {**state, "model_ema": self.ema.state_dict()} if self.ema is not None else state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():  # a disabled scaler saves {} and must not load it
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(exact_buffers(state["model_ema"], state["model"], EMA_PREFIX))


def build(model: nn.Module, device: torch.device, args, steps_per_epoch: int) -> Optimization:
    """The Optimization of fgic.ddp's resolved flags for `model` (bare, on its device)."""
    try:
        groups = param_groups(model, args.weight_decay, args.norm_weight_decay, args.layer_decay, arch=args.arch)
    except FgicError as exc:
        if config.RECIPES[args.recipe].get("layer_decay") != args.layer_decay:
            raise
        raise FgicError(f"{exc} (--layer-decay {args.layer_decay:g} comes from --recipe {args.recipe})") from None
    for group in groups:
        group["lr"] = args.lr * group["lr_scale"]
    if args.opt == "adamw":
        optimizer = adamw(groups, device, lr=args.lr)
    else:
        optimizer = sgd(groups, device, lr=args.lr, momentum=args.momentum)
    per_step = args.lr_warmup_epochs > 0
    factor = None
    if per_step:
        factor = warmup_cosine(args.epochs, steps_per_epoch, args.lr_warmup_epochs, args.lr_warmup_method,
                               args.lr_warmup_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    ema = None
    if args.model_ema:
        decay = ema_decay(args.model_ema_decay, args.batch_size, args.model_ema_steps, args.epochs)
        ema = AveragedModel(model, multi_avg_fn=ema_average(decay), use_buffers=True)
        notice = ema_horizon_notice(args, steps_per_epoch, decay)
        if notice and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            print(notice, file=sys.stderr, flush=True)
    return Optimization(optimizer, scheduler, per_step, torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"),
                        model, args.clip_grad_norm, ema, args.model_ema_steps,
                        args.lr_warmup_epochs * steps_per_epoch, factor=factor)
