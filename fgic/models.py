"""Models: a torchvision classifier by name, its head replaced for the dataset, its weights, its BatchNorm synchronised."""
from __future__ import annotations

import difflib
import sys

import torch
from torch import nn
from torchvision import models

from fgic import weights as weights_mod
from fgic.errors import FgicError
from fgic.syncbn import convert_sync_batchnorm

IMAGENET_CLASSES = 1000


def check_arch(arch: str) -> None:
    names = models.list_models(module=models)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise FgicError(f"--arch {arch}: not a torchvision classification model; {hint}")


def build(arch: str, num_classes: int, weights: str) -> nn.Module:
    """torchvision's `arch` with --weights applied and every 1000-way ImageNet head replaced by a num_classes one."""
    check_arch(arch)
    model = models.get_model(arch, weights=None)
    if weights.split(":")[0] == "imagenet":
        model.load_state_dict(weights_mod.load_imagenet(arch, weights))
    heads = replace_head(model, num_classes)
    if weights not in ("none",) and weights.split(":")[0] != "imagenet":
        load_file(model, weights, heads)
    return model


def replace_head(model: nn.Module, num_classes: int) -> list[str]:
    """Swap each layer that outputs the 1000 ImageNet classes (fc, classifier[-1], heads.head, AuxLogits.fc, a 1x1
    conv...) for a freshly initialised one with num_classes outputs; returns their names."""
    names = []
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.Linear) and layer.out_features == IMAGENET_CLASSES:
            new = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
        elif isinstance(layer, nn.Conv2d) and layer.out_channels == IMAGENET_CLASSES:
            new = nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size, layer.stride, layer.padding,
                            bias=layer.bias is not None)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        names.append(name)
    if not names:
        raise FgicError(f"{type(model).__name__}: found no 1000-class output layer to replace")
    return names


def load_file(model: nn.Module, path: str, heads: list[str]) -> None:
    """Load a state_dict file: a whole fine-tuned model, or a backbone whose head has another class count (the
    head then stays freshly initialised)."""
    state = weights_mod.read_state_dict(path)
    own = model.state_dict()
    head_keys = {k for k in own if k.rpartition(".")[0] in heads}
    mismatched = {k for k, v in state.items() if k in own and v.shape != own[k].shape}
    if mismatched - head_keys:
        k = sorted(mismatched - head_keys)[0]
        raise FgicError(f"--weights {path}: {k} has shape {tuple(state[k].shape)}, {type(model).__name__} needs "
                        f"{tuple(own[k].shape)}; is it a different --arch?")
    if mismatched:
        print(f"fgic: notice: {path} has another class count; its head ({', '.join(heads)}) is not loaded",
              file=sys.stderr)
        state = {k: v for k, v in state.items() if k not in mismatched}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - (mismatched & head_keys)
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise FgicError(f"--weights {path}: does not fit --arch {type(model).__name__} ({what})")


def sync_batchnorm(model: nn.Module, device: torch.device, distributed: bool, same_code: bool = False) -> nn.Module:
    """BatchNorm statistics over the global batch when several processes train: torch's SyncBatchNorm on CUDA,
    fgic's AllReduceBatchNorm (float64 statistics) on the CPU. With `same_code` (--deterministic) a single CPU
    process uses AllReduceBatchNorm too, so that 1 and N processes differ only in how float32 gradient sums are
    grouped: torch's native CPU BatchNorm rounds differently, and ReLU networks amplify that into visibly
    different weights within a few steps. It costs speed (resnet50 at 448 px: 25 s per step of 8 instead of 14)."""
    if device.type == "cuda":
        return convert_sync_batchnorm(model, "cuda") if distributed else model
    return convert_sync_batchnorm(model, device.type) if distributed or same_code else model


def logits(output) -> torch.Tensor:
    """The main output of a model (Inception/GoogLeNet return a named tuple with aux outputs while training)."""
    return output.logits if hasattr(output, "logits") else output
