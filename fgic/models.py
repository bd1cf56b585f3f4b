"""Models: a torchvision classifier by name (or timm's, fgic.timm_models), built for the crop size, its head replaced
for the dataset, its weights, its BatchNorm synchronised."""
from __future__ import annotations

import difflib
import math
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision import models
from torchvision.models.vision_transformer import interpolate_embeddings
from torchvision.ops import StochasticDepth

from fgic import augment, drop, optim, runlog, timm_models
from fgic import weights as weights_mod
from fgic.errors import FgicError
from fgic.syncbn import convert_sync_batchnorm

IMAGENET_CLASSES = 1000
# The auxiliary classifiers of GoogLeNet and Inception v3. fgic builds these archs without them (see `options`), so
# their entries in a weights file are dropped, as torchvision's googlenet builder drops them after loading ImageNet's.
AUX_HEADS = ("aux1.", "aux2.", "AuxLogits.")
# How long check_input looks for crops that work near a refused one: larger crops first, for up to MAX_S (up to
# crop + 512), then smaller ones for up to MORE_S (a crop too small for a model fails at every smaller one too). A try
# costs a constructor call that fails at once (ViTs, MaxViT) or a forward on the meta device up to the layer that
# fails (inception_v3 near 64 px: 0.13 s of CPU; its refusal at 64 px takes 2.7 s of CPU in all, densenet201's at 8 px
# 5 s, a ViT's or MaxViT's under 1 s).
MORE_S, MAX_S = 1.0, 20.0


def check_arch(arch: str) -> None:
    if timm_models.is_timm(arch):
        return timm_models.check_arch(arch)
    names = models.list_models(module=models)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise FgicError(f"--arch {arch}: not a torchvision classification model; {hint}")


def options(arch: str, crop: int | None) -> dict:
    """The constructor arguments fgic builds `arch` with. ViTs and MaxViT are built for one image size, crop x crop.
    GoogLeNet and Inception v3 come without their auxiliary heads (the loss uses the main output only, so under DDP
    their parameters get no gradient and the second step stops with "Expected to have finished reduction") and with
    transform_input=True, as torchvision builds them for their ImageNet weights, which expect it. The flag is in no
    state_dict, so fgic sets it whatever --weights is: a file trained by fgic, from ImageNet or from scratch, loads
    into the model it was trained as (from scratch it is a fixed per-channel affine map of the input)."""
    if crop is not None and arch.startswith("vit_"):
        return {"image_size": crop}
    if crop is not None and arch.startswith("maxvit_"):
        return {"input_size": (crop, crop)}
    if arch in ("googlenet", "inception_v3"):
        # init_weights=True is torchvision's default for these; naming it avoids its FutureWarning
        return {"aux_logits": False, "transform_input": True, "init_weights": True}
    return {}


def construct(arch: str, crop: int | None = None, stochastic_depth: float | None = None,
              dropout: float | None = None) -> nn.Module:
    """torchvision's `arch`, freshly initialised, with fgic's constructor options (see `options`) and the
    --stochastic-depth and --dropout rates (see `with_rates`); or timm's (`--arch timm:NAME`)."""
    if timm_models.is_timm(arch):
        return timm_models.construct(arch, crop, stochastic_depth, dropout)
    opts = options(arch, crop)
    if stochastic_depth is None and dropout is None:
        return models.get_model(arch, weights=None, **opts)
    return with_rates(arch, opts, stochastic_depth, dropout)


def with_rates(arch: str, opts: dict, stochastic_depth: float | None, dropout: float | None) -> nn.Module:
    """`arch` built with torchvision's stochastic_depth_prob and dropout arguments. Swin's and MaxViT's builders fix
    stochastic_depth_prob themselves: their StochasticDepth rates (a linear ramp whose deepest block carries the
    arch's rate) are scaled to make the deepest P, which is what the argument would give. One line for an arch
    without the layer (a ResNet, a ViT has no stochastic depth; ConvNeXt, MaxViT no nn.Dropout argument)."""
    given = {k: v for k, v in (("stochastic_depth_prob", stochastic_depth), ("dropout", dropout)) if v is not None}
    rescale = None
    try:
        model = models.get_model(arch, weights=None, **opts, **given)
    except TypeError as exc:
        if "multiple values for keyword argument 'stochastic_depth_prob'" not in str(exc):
            flag = "--dropout" if "'dropout'" in str(exc) else "--stochastic-depth"
            raise FgicError(f"{flag}: torchvision's {arch} has no such rate; leave {flag} out") from None
        rescale = given.pop("stochastic_depth_prob")
        model = models.get_model(arch, weights=None, **opts, **given)
    depth = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    if stochastic_depth is not None and not depth:  # a builder that takes and ignores the argument (MobileNetV3)
        raise FgicError(f"--stochastic-depth: torchvision's {arch} has no stochastic depth; leave it out")
    if dropout is not None and not any(type(m) is nn.Dropout and m.p == dropout for m in model.modules()):
        raise FgicError(f"--dropout: torchvision's {arch} has no dropout rate to set; leave it out")
    if rescale is not None:
        deepest = max(m.p for m in depth)  # above 0 in every torchvision arch that has the layer
        for m in depth:
            m.p = m.p * rescale / deepest
    return model


def build(arch: str, num_classes: int, weights: str, crop: int | None = None, keyed_drop: bool = True,
          stochastic_depth: float | None = None, dropout: float | None = None, new_head: bool = True) -> nn.Module:
    """torchvision's `arch` for crop x crop images (None: its default size) with --weights applied, every 1000-way
    ImageNet head replaced by a num_classes one, the rates of stochastic depth and dropout given (None: the arch's),
    both keyed per sample (fgic.drop; not with keyed_drop=False: torch's own, per process). new_head=False refuses a
    weights file whose head has another class count (scoring it would score a fresh head)."""
    check_arch(arch)
    if timm_models.is_timm(arch):
        model, heads = timm_models.build(arch, num_classes, weights, crop, stochastic_depth, dropout)
    else:
        model = construct(arch, crop, stochastic_depth, dropout)
        if weights.split(":")[0] == "imagenet":
            state = fit_to_model(model, weights_mod.load_imagenet(arch, weights), f"{arch}'s ImageNet weights")
            model.load_state_dict(state)
        heads = replace_head(model, num_classes)
    if weights not in ("none",) and weights.split(":")[0] != "imagenet":
        load_file(model, weights, heads, new_head)
    if keyed_drop:
        drop.replace(model)
    return model


def normalization(arch: str, weights: str) -> augment.Normalization:
    """How `weights` take their inputs: ImageNet weights as trained (timm's pretrained config: 0.5s for its ViTs'
    default tags, CLIP's for EVA and others; torchvision's weights' transforms: 0.5s for efficientnet_v2_l), a
    weights file as its fgic run's config.json beside it says, else ImageNet's (from scratch, a file from elsewhere)."""
    kind = weights.split(":")[0]
    if kind == "imagenet" and timm_models.is_timm(arch):
        cfg = timm_models.pretrained_cfg(arch, weights)
        return augment.Normalization(tuple(cfg.mean), tuple(cfg.std))
    if kind == "imagenet":
        preset = weights_mod.imagenet_weights(arch, weights).transforms()
        return augment.Normalization(tuple(preset.mean), tuple(preset.std))
    run = runlog.run_config(Path(weights)) if kind != "none" else None
    if run is not None and "mean" in run and "std" in run:  # a run from before --mean/--std: ImageNet's
        return augment.Normalization(tuple(run["mean"]), tuple(run["std"]))
    return augment.IMAGENET


# torchvision's published DenseNet files name a dense layer's parts norm.1, relu.1, conv.1, norm.2, ... (the module
# names of its first release); the modules are norm1, relu1, conv1, ... since (torchvision renames them on load too)
OLD_DENSE_LAYER = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def fit_to_model(model: nn.Module, state: dict, source: str) -> dict:
    """A state_dict made fit for fgic's build of its arch: DenseNet's old key names renamed, auxiliary heads dropped,
    and a ViT's position embeddings for another image size interpolated to the model's patch grid (torchvision's
    interpolate_embeddings), with a notice."""
    state = {OLD_DENSE_LAYER.sub(r"\1\2.", k): v for k, v in state.items() if not k.startswith(AUX_HEADS)}
    key = "encoder.pos_embedding"
    if not isinstance(model, models.VisionTransformer) or key not in state:
        return state
    have, want = state[key].shape, model.encoder.pos_embedding.shape
    side = math.isqrt(have[1] - 1) if len(have) == 3 and have[1] > 1 else 0
    if have == want or side * side != have[1] - 1 or have[2] != want[2]:
        return state  # the same grid, or not a ViT of this width: load_state_dict names the mismatch
    grid = model.image_size // model.patch_size
    print(f"fgic: notice: {source}: position embeddings for {side}x{side} patches interpolated to {grid}x{grid} for "
          f"--crop {model.image_size}", file=sys.stderr)
    return dict(interpolate_embeddings(model.image_size, model.patch_size, state))


def check_input(arch: str, crop: int) -> None:
    """Stop with one line when `arch` cannot train on crop x crop images; says which crops nearby can. Meant for
    before any data work: at 448 px it takes 0.15-0.75 s of CPU for the archs of torchvision 0.29, regnets included
    (see `construct_on_meta`)."""
    built: dict = {}
    problem = input_problem(arch, crop, built)
    if problem is None:
        return
    found = [str(c) for c in nearest_crops(arch, crop, built) if c is not None]
    hint = f"try --crop {' or '.join(found)}" if found else "no crop near it was found to work"
    raise FgicError(f"--arch {arch} cannot take --crop {crop} ({problem}); {hint}")


def input_problem(arch: str, crop: int, built: dict | None = None) -> str | None:
    """Why `arch` cannot run a training-mode forward of 2 crop x crop images (the batch of 2 gives BatchNorm more than
    one value per channel, training mode takes the train-only paths), or None when it can. The model is built on the
    meta device, where tensors have shapes but no data: no memory, no arithmetic. `built` keeps models between calls
    for archs whose structure does not depend on the crop."""
    built = {} if built is None else built
    key = repr(options(arch, crop))
    try:
        if key not in built:
            built[key] = construct_on_meta(arch, crop)
        model = built[key]
        image = torch.zeros(2, 3, crop, crop, device="meta")
        try:
            model(image)
        except Exception as exc:  # a meta limitation, not the crop's: a real forward decides (no arch needs it today)
            if not meta_limited(exc):
                raise
            with torch.no_grad():
                construct(arch, crop).train()(torch.zeros(2, 3, crop, crop))
    except Exception as exc:  # a size the model cannot take fails in whatever layer breaks, with any exception type
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return None


def construct_on_meta(arch: str, crop: int) -> nn.Module:
    """`construct` on the meta device, in training mode. RegNets compute their widths from tensors while building,
    which the meta device cannot read back: those are built with only their parameters on it (see EmptyOnMeta), the
    small buffers moved after."""
    try:
        with torch.device("meta"):
            return construct(arch, crop).train()
    except Exception as exc:
        if not meta_limited(exc):
            raise
    with EmptyOnMeta():
        return construct(arch, crop).to("meta").train()


class EmptyOnMeta(TorchFunctionMode):
    """`torch.empty` without a device makes meta tensors, every other call runs as usual: nn.Module's parameters are
    torch.empty, a RegNet's width arithmetic is not. Built on the CPU instead, regnet_y_128gf took 7.8 s and 2.4 GB,
    most of it in the initialisers (measured on this machine's CPU); this way 0.2 s."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def meta_limited(exc: Exception) -> bool:
    """Whether an exception says that an operation cannot run on the meta device (no kernel, no data to read)."""
    return isinstance(exc, NotImplementedError) or "meta" in str(exc).lower()


def nearest_crops(arch: str, crop: int, built: dict | None = None) -> tuple[int | None, int | None]:
    """The crops nearest to `crop` below and above it on which `arch` runs; None where none was found (see MORE_S)."""
    built = {} if built is None else built
    above = first_fitting(arch, range(crop + 1, crop + 513), MAX_S, built)
    return first_fitting(arch, range(crop - 1, 0, -1), MORE_S, built), above


def first_fitting(arch: str, crops, seconds: float, built: dict) -> int | None:
    """The first of `crops` that `arch` runs on; None if none does, or none did within `seconds`."""
    deadline = time.monotonic() + seconds
    for crop in crops:
        if input_problem(arch, crop, built) is None:
            return crop
        if time.monotonic() > deadline:
            return None
    return None


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


def load_file(model: nn.Module, path: str, heads: list[str], new_head: bool = True) -> None:
    """Load a state_dict file: a whole fine-tuned model, or a backbone whose head has another class count (the
    head then stays freshly initialised; refused with new_head=False)."""
    state = fit_to_model(model, weights_mod.read_state_dict(path), path)
    own = model.state_dict()
    if Path(path).name == runlog.BEST_EMA:  # an EMA's integer buffers are the model's constants (optim.exact_buffers)
        state = optim.exact_buffers(state, own)
    head_keys = {k for k in own if k.rpartition(".")[0] in heads}
    mismatched = {k for k, v in state.items() if k in own and v.shape != own[k].shape}
    if mismatched - head_keys:
        k = sorted(mismatched - head_keys)[0]
        raise FgicError(f"--weights {path}: {k} has shape {tuple(state[k].shape)}, {type(model).__name__} needs "
                        f"{tuple(own[k].shape)}; is it a different --arch?")
    if mismatched and not new_head:
        k = sorted(mismatched)[0]
        raise FgicError(f"--weights {path}: its head has another class count ({k}: {tuple(state[k].shape)}, this -d "
                        f"needs {tuple(own[k].shape)}); give the -d it was trained on")
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
    """BatchNorm statistics over the global batch when several processes train: fgic's AllReduceBatchNorm (one
    collective per layer, no host sync, compiles whole; float64 statistics on the CPU). With `same_code`
    (--deterministic) a single CPU process uses AllReduceBatchNorm too, so that 1 and N processes differ only in how
    float32 gradient sums are grouped: torch's native CPU BatchNorm rounds differently, and ReLU networks amplify that
    into visibly different weights within a few steps. It costs speed (resnet50 at 448 px: 25 s per step of 8 instead
    of 14). A single GPU keeps torch's BatchNorm (cuDNN)."""
    if device.type == "cuda":
        return convert_sync_batchnorm(model) if distributed else model
    return convert_sync_batchnorm(model) if distributed or same_code else model


def logits(output) -> torch.Tensor:
    """The main output of a model: torchvision's Inception/GoogLeNet with auxiliary heads return a named tuple while
    training (fgic builds them without, see `options`)."""
    return output.logits if hasattr(output, "logits") else output
