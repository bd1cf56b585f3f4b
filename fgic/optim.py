"""The optimisation of a run: SGD or AdamW over parameter groups (norm and layer decay), the lr schedule, gradient
clipping and the EMA of the weights (`Optimization`)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fgic.errors import FgicError
from fgic.syncbn import AllReduceBatchNorm

NORM_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, AllReduceBatchNorm)


def blocks(model: nn.Module) -> list[str]:
    """The model's blocks in forward order: the children of each Sequential whose children are all composite
    modules of one class (EncoderBlock, SwinTransformerBlock, CNBlock, MBConv, Bottleneck, ...)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if found and any(name.startswith(f"{b}.") for b in found):
            continue
        children = list(module.children())
        if isinstance(module, nn.Sequential) and len(children) > 1 and len({type(c) for c in children}) == 1 \
                and all(any(True for _ in c.children()) for c in children):
            found.extend(f"{name}.{n}" if name else n for n, _ in module.named_children())
    return found


def layer_ids(model: nn.Module, arch: str) -> tuple[dict[str, int], int]:
    """Each parameter's layer: 0 before the first block, k + 1 in block k (between blocks: the next block's),
    L + 1 after the last; and L."""
    names = blocks(model)
    if len(names) < 2:
        raise FgicError(f"--layer-decay: {arch} has no sequence of blocks to number (ViT, Swin, ConvNeXt, "
                        f"EfficientNet, ResNet have one); leave --layer-decay out")
    ids, seen = {}, 0  # seen: the id of the last block met
    for pname, _ in model.named_parameters():
        block = next((i for i, b in enumerate(names) if pname.startswith(f"{b}.")), None)
        if block is not None:
            seen = ids[pname] = block + 1
        else:
            ids[pname] = 0 if seen == 0 else seen + 1  # after the last block: len(names) + 1
    return ids, len(names)


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None = None,
                 layer_decay: float | None = None, *, arch: str = "the model") -> list[dict]:
    """Parameter groups by (layer, decay); one group of all parameters when neither option is set (the seed's
    optimizer, exactly). Norm layers' parameters and biases take `norm_weight_decay` when given."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if norm_weight_decay is None and layer_decay is None:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay, "lr_scale": 1.0}]
    norms = {f"{m}.{n}" if m else n for m, mod in model.named_modules() if isinstance(mod, NORM_CLASSES)
             for n, _ in mod.named_parameters(recurse=False)}
    ids, layers = layer_ids(model, arch) if layer_decay is not None else ({}, 0)
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


def ema_decay(decay: float, batch_size: int, every: int, epochs: int) -> float:
    """torchvision's reference adjustment of --model-ema-decay to the global batch, the steps between updates and the
    epochs: the EMA's horizon is then epochs / ((1 - decay) x train images) epochs, whatever the batch."""
    return 1.0 - min(1.0, (1.0 - decay) * batch_size * every / epochs)


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
            self.ema.load_state_dict(state["model_ema"])


def build(model: nn.Module, device: torch.device, args, steps_per_epoch: int) -> Optimization:
    """The Optimization of fgic.ddp's resolved flags for `model` (bare, on its device)."""
    groups = param_groups(model, args.weight_decay, args.norm_weight_decay, args.layer_decay, arch=args.arch)
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
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    return Optimization(optimizer, scheduler, per_step, torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"),
                        model, args.clip_grad_norm, ema, args.model_ema_steps,
                        args.lr_warmup_epochs * steps_per_epoch, factor=factor)
