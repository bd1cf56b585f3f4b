"""Command-line flags of fgic.ddp and their resolution into one run config (recipe defaults, demo defaults, lr rule)."""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

from fgic.errors import FgicError

# Options added later, off in the seed's recipe (torchvision's reference names and defaults). A run that predates
# them ran with these values: `completed` fills them into an older config.json or checkpoint.
LATER = {
    "recipe": "seed",
    "opt": "sgd",
    "norm_weight_decay": None,  # None: --weight-decay for every parameter
    "layer_decay": None,
    "lr_warmup_epochs": 0,
    "lr_warmup_method": "constant",
    "lr_warmup_decay": 0.01,
    "clip_grad_norm": None,
    "model_ema": False,
    "model_ema_decay": 0.99998,
    "model_ema_steps": 32,
    "auto_augment": "none",
    "random_erase": 0.0,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "stochastic_depth": None,  # None: the arch's own rate
    "dropout": None,
}
# The reference recipe. Flags left unset take these values (or DEMO's, for -d demo).
RECIPE = {
    "arch": "resnet50",
    "weights": "imagenet",
    "batch_size": 64,
    "epochs": 128,
    "resize": 512,
    "crop": 448,
    "padding": 8,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "label_smoothing": 0.1,
    "workers": None,  # None: chosen from the CPUs available to each process
    **{k: v for k, v in LATER.items() if k != "recipe"},
}
LR_PER_256 = 0.1  # the seed's linear scaling rule: --lr = global batch / 256 x 0.1
# --recipe NAME: values for the flags left unset, over the seed's (RECIPE) and the demo's. Sources in the README
# ("Recipes"); "lr_per_256" replaces LR_PER_256 in the lr rule. What each preset leaves out of its source is said there.
RECIPES = {
    "seed": {},
    # torchvision's ResNet-50 IMAGENET1K_V2 recipe (references/classification), its pieces for fine-tuning: the seed's
    # SGD, lr rule, weight decay, sizes and epochs stay; EMA decay for FGVC's ~6k images (see the README).
    "tv-v2": {"norm_weight_decay": 0.0, "lr_warmup_epochs": 5, "lr_warmup_method": "linear", "lr_warmup_decay": 0.01,
              "auto_augment": "ta_wide", "random_erase": 0.1, "mixup_alpha": 0.2, "cutmix_alpha": 1.0,
              "model_ema": True, "model_ema_steps": 32, "model_ema_decay": 0.998},
    # MAE's ViT fine-tuning recipe (AdamW, lr 5e-4 x batch/256, wd 0.05, layer decay 0.65, 5 warmup epochs, mixup 0.8,
    # cutmix 1.0, random erasing 0.25), with TrivialAugment for RandAugment and torchvision's ViT clipping and EMA.
    "transformer": {"opt": "adamw", "lr_per_256": 5e-4, "weight_decay": 0.05, "norm_weight_decay": 0.0,
                    "layer_decay": 0.65, "lr_warmup_epochs": 5, "lr_warmup_method": "linear",
                    "lr_warmup_decay": 0.01, "clip_grad_norm": 1.0, "auto_augment": "ta_wide", "random_erase": 0.25,
                    "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "model_ema": True, "model_ema_steps": 32,
                    "model_ema_decay": 0.998},
}
AUTO_AUGMENT = ("none", "ta_wide", "ra", "augmix")
# -d demo: small enough to finish in a few minutes on a laptop CPU, from scratch (no download).
DEMO = {
    "arch": "resnet18",
    "weights": "none",
    "batch_size": 32,
    "epochs": 8,
    "resize": 72,
    "crop": 64,
    "padding": 4,
}
AMP_MODES = ("off", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
# Options that change what a run computes: resuming across a change of any of them is refused, and fgic.report
# groups runs by them. The world size and the worker count are not among them: fgic gives the same result on any
# layout, so a run may resume on another.
MEANING = ("dataset", "num_classes", "arch", "weights", "batch_size", "epochs", "lr", "momentum", "weight_decay",
           "label_smoothing", "resize", "crop", "padding", "seed", "amp", "recipe", "opt", "norm_weight_decay",
           "layer_decay", "lr_warmup_epochs", "lr_warmup_method", "lr_warmup_decay", "clip_grad_norm", "model_ema",
           "model_ema_decay", "model_ema_steps", "auto_augment", "random_erase", "mixup_alpha", "cutmix_alpha",
           "stochastic_depth", "dropout")
REGISTRY = ("cub", "aircraft", "cars", "nabirds", "dogs", "flowers", "pets", "demo")  # -d NAME: --data-root/NAME
# The seed's -a took 0 (off), 1 (NVIDIA apex O1) and 2 (native fp16 AMP).
_LEGACY_AMP = {"0": "off", "1": "fp16", "2": "fp16"}


def dataset_name(data: str) -> str:
    """-d NAME|PATH -> the dataset's name in the run folder's path, without looking at the data."""
    return data if data in REGISTRY else Path(data).resolve().name


def default_data_root() -> str:
    """Where the registry names (REGISTRY) live: $FGIC_DATA, else ./data."""
    return os.environ.get("FGIC_DATA", "data")


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations (`--model` would match --model-ema, a typo another flag), whose errors are one
    FgicError line: an unknown flag names the nearest real one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        flag = next((a.partition("=")[0] for a in unknown if a.startswith("-")), None)
        if flag is None:
            raise FgicError(f"{message} (python -m {self.prog} -h lists the flags)")
        near = difflib.get_close_matches(flag, list(self._option_string_actions), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}? " if near else ""
        raise FgicError(f"unknown flag {flag}: {hint}(python -m {self.prog} -h lists the flags)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The fgic.ddp parser; launchers reuse it with add_help=False as a parent."""
    p = Parser("fgic.ddp", add_help=add_help,
               description="Train or evaluate a fine-grained classifier with the reference recipe. Flags of "
                           "torchvision's classification reference and timm's train.py are accepted under their "
                           "names too (shown beside fgic's).")
    g = p.add_argument_group("data")
    g.add_argument("-d", "--data", "--data-path", metavar="NAME|PATH",
                   help=f"{', '.join(REGISTRY)} (a folder under --data-root), or a folder with train/ and test/")
    g.add_argument("--data-root", default=default_data_root(),
                   help="where registry names live (default: $FGIC_DATA or ./data)")
    g.add_argument("-w", "-j", "--workers", type=int, help="data loader workers per process (default: from the CPUs)")
    g.add_argument("--resize", type=int, help=f"resize to N x N before cropping (default {RECIPE['resize']})")
    g.add_argument("--crop", "--train-crop-size", "--img-size", type=int,
                   help=f"crop size, training and test (default {RECIPE['crop']})")
    g.add_argument("--padding", type=int, help=f"zero padding before the random crop (default {RECIPE['padding']})")
    g.add_argument("--check-images", default="fast", choices=("fast", "full", "off"),
                   help="before training: fast (headers and end markers), full (decode every image) or off "
                        "(default fast)")
    g.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out (with a count) "
                                                                  "instead of stopping")
    g.add_argument("--auto-augment", "--aa", choices=AUTO_AUGMENT, help="per-image policy: TrivialAugment (ta_wide), "
                                                                "RandAugment (ra), AugMix (default none)")
    g.add_argument("--random-erase", "--reprob", type=float, metavar="P",
                   help="random erasing probability (default 0)")
    g.add_argument("--mixup-alpha", "--mixup", type=float,
                   help="mixup's Beta(alpha, alpha); partners from the whole train set (default 0: off)")
    g.add_argument("--cutmix-alpha", "--cutmix", type=float,
                   help="cutmix's Beta(alpha, alpha) (default 0: off; with mixup, half the samples each)")
    g.add_argument("--cache", default="auto", choices=("auto", "on", "off"),
                   help="decode and resize each split once into a memory-mapped file shared by the node's processes: "
                        "auto (when it fits in memory), on or off (default auto)")
    g.add_argument("--cache-dir", metavar="DIR", help="where the cache lives; node-local is best (default: $FGIC_CACHE "
                                                      "or fgic-cache-UID in $TMPDIR or /tmp)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", "--model",
                   help="any torchvision classification model, or timm:NAME with timm installed (default resnet50)")
    g.add_argument("--pretrained", dest="weights", action="store_const", const="imagenet",
                   help="the same as --weights imagenet")
    g.add_argument("--weights", metavar="imagenet|none|PATH",
                   help="imagenet (torchvision's, from the torch cache; imagenet:NAME picks e.g. IMAGENET1K_V2; for "
                        "timm: the default tag from the Hugging Face cache, imagenet:TAG another), none, or a "
                        "state_dict file (default imagenet)")
    g.add_argument("--stochastic-depth", "--drop-path", type=float, metavar="P",
                   help="stochastic depth rate of the deepest block (torchvision's stochastic_depth_prob, timm's "
                        "drop_path_rate; default: the arch's)")
    g.add_argument("--dropout", "--drop", type=float, metavar="P", help="dropout rate (torchvision's dropout, "
                                                                         "timm's drop_rate; default: the arch's)")

    g = p.add_argument_group("optimisation")
    g.add_argument("-b", "--batch-size", type=int, help="GLOBAL batch, split evenly over the processes (default 64)")
    g.add_argument("--epochs", type=int, help="epochs (default 128)")
    g.add_argument("--lr", type=float, help="learning rate (default: global batch / 256 x 0.1)")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", "--wd", type=float,
                   help=f"weight decay, SGD's or AdamW's (default {RECIPE['weight_decay']:g}; a --recipe's own)")
    g.add_argument("--label-smoothing", "--smoothing", type=float,
                   help=f"label smoothing (default {RECIPE['label_smoothing']:g})")
    g.add_argument("--recipe", choices=tuple(RECIPES), help="fill the flags left unset from a named set: seed (the "
                                                           "default), tv-v2 or transformer (see README 'Recipes')")
    g.add_argument("--opt", choices=("sgd", "adamw"), help="optimizer (default sgd)")
    g.add_argument("--norm-weight-decay", type=float, help="weight decay of norm layers and biases (default: "
                                                           "--weight-decay)")
    g.add_argument("--layer-decay", type=float, help="layer-wise lr decay: block k of L gets lr x X^(L+1-k), the "
                                                     "head lr (ViT, Swin, ConvNeXt, EfficientNet, MobileNet, RegNet, "
                                                     "ResNet, MaxViT, MNASNet, ShuffleNet, timm models; default off)")
    g.add_argument("--lr-warmup-epochs", "--warmup-epochs", type=int,
                   help="epochs of lr warmup, per step, before the cosine (default 0)")
    g.add_argument("--lr-warmup-method", choices=("linear", "constant"), help="warmup shape (default constant)")
    g.add_argument("--lr-warmup-decay", type=float, help="warmup's first lr factor (default 0.01)")
    g.add_argument("--clip-grad-norm", "--clip-grad", type=float,
                   help="clip the global gradient norm to X (default off)")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction,
                   help="also keep and evaluate an exponential moving average of the weights")
    g.add_argument("--model-ema-decay", type=float, help="EMA decay, adjusted for the global batch and "
                                                         "--model-ema-steps as torchvision's (default 0.99998)")
    g.add_argument("--model-ema-steps", type=int, help="steps between EMA updates (default 32)")
    g.add_argument("-a", "--amp", default="auto", nargs="?", const="fp16", metavar="auto|off|fp16|bf16",
                   help="mixed precision (default auto: bf16 on a GPU that has it, fp16 on one without, off on the "
                        "CPU; a bare --amp is fp16, as in torchvision's reference and timm; the seed's 0/1/2 are "
                        "accepted)")
    g.add_argument("-s", "--seed", type=int, default=2020,
                   help="seed of the weights, order and augmentation (default 2020)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (slow start, faster steps on a GPU; default off)")
    g.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile's mode with --compile: its speed only, not what is computed (default default)")
    g.add_argument("--sync-bn", action="store_true",
                   help="accepted for torchvision's reference: fgic always synchronises BatchNorm over the global "
                        "batch when several processes train")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms and, on the CPU, the same BatchNorm code on 1 or N "
                        "processes (slower; for exact comparisons)")

    g = p.add_argument_group("run")
    g.add_argument("-g", "--gpu", help="GPU ids, e.g. 0 or 0,1,2,3 (several start one process each)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    g.add_argument("-n", "--note", default="", help="a word added to the run's name")
    g.add_argument("--output-dir", "--output", default="runs",
                   help="runs go to OUTPUT_DIR/DATASET/RUN_NAME (default ./runs)")
    g.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: continue the run folder's checkpoint.pt if any; none: start over; or a checkpoint")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars per epoch to "
                                                              "RUN_DIR/tb (needs the tensorboard package)")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases from rank 0, one W&B run per run "
                                                       "folder across requeues (pip install wandb; "
                                                       "WANDB_MODE=offline, then `wandb sync`, works offline)")
    g.add_argument("--wandb-project", default="fgic", help="the W&B project (default fgic)")
    g.add_argument("--wandb-entity", help="the W&B team or user (default: your W&B default)")
    g.add_argument("--wandb-group", help="the W&B group (default: none; a sweep's runs get the sweep's)")
    g.add_argument("--eval-only", "--test-only", action="store_true",
                   help="evaluate --resume PATH or --weights PATH and write eval.json")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the recipe (or demo) defaults, normalise --amp and apply the lr rule; checks the values."""
    if not args.data:
        raise FgicError(f"-d/--data is required: a dataset name ({', '.join(REGISTRY)}) or a folder with train/ "
                        f"and test/")
    if getattr(args, "recipe", None) is None:
        args.recipe = "seed"
    preset = dict(RECIPES[args.recipe])
    per_256 = preset.pop("lr_per_256", LR_PER_256)
    defaults = {**RECIPE, **(DEMO if args.data == "demo" else {}), **preset}
    from_preset = {key for key in preset if getattr(args, key, None) is None}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.amp = _resolve_amp(str(args.amp))
    if args.lr is None:
        args.lr = scaled_lr(args.batch_size, per_256)
    args.note = args.note.strip()
    if args.note and not all(c.isalnum() or c in "-_." for c in args.note):
        raise FgicError(f"-n/--note {args.note!r}: use letters, digits, '-', '_' or '.' (it becomes part of a folder "
                        f"name)")
    for flag, value in (("--batch-size", args.batch_size), ("--epochs", args.epochs)):
        if value < 1:
            raise FgicError(f"{flag} {value}: must be at least 1")
    check_sizes(args.resize, args.crop, args.padding)
    if args.workers is not None and args.workers < 0:
        raise FgicError(f"-w/--workers {args.workers}: must be 0 or more")
    if not 0 <= args.label_smoothing < 1:
        raise FgicError(f"--label-smoothing {args.label_smoothing}: must be in [0, 1)")
    if args.lr <= 0:
        raise FgicError(f"--lr {args.lr}: must be positive")
    check_recipe(args, from_preset)
    return args


def check_recipe(args: argparse.Namespace, from_preset: set = frozenset()) -> None:
    """The values of the optimisation and augmentation flags beyond the seed's; a value that --recipe set (the keys
    in `from_preset`) is named as the preset's."""
    ranges = (("--weight-decay", args.weight_decay, 0, None), ("--norm-weight-decay", args.norm_weight_decay, 0, None),
              ("--random-erase", args.random_erase, 0, 1), ("--stochastic-depth", args.stochastic_depth, 0, 1),
              ("--dropout", args.dropout, 0, 1), ("--mixup-alpha", args.mixup_alpha, 0, None),
              ("--cutmix-alpha", args.cutmix_alpha, 0, None), ("--lr-warmup-epochs", args.lr_warmup_epochs, 0, None))
    for flag, value, low, high in ranges:
        if value is not None and (value < low or (high is not None and value > high)):
            raise FgicError(f"{flag} {value}: must be in [{low}, {high if high is not None else 'inf'})")
    for flag, value in (("--layer-decay", args.layer_decay), ("--lr-warmup-decay", args.lr_warmup_decay),
                        ("--model-ema-decay", args.model_ema_decay)):
        if value is not None and not 0 < value <= 1:
            raise FgicError(f"{flag} {value}: must be in (0, 1]")
    if args.clip_grad_norm is not None and args.clip_grad_norm <= 0:
        raise FgicError(f"--clip-grad-norm {args.clip_grad_norm}: must be positive (leave it out for no clipping)")
    if args.model_ema_steps < 1:
        raise FgicError(f"--model-ema-steps {args.model_ema_steps}: must be at least 1")
    if args.lr_warmup_epochs >= args.epochs:
        if "lr_warmup_epochs" in from_preset:
            raise FgicError(f"--lr-warmup-epochs {args.lr_warmup_epochs} (from --recipe {args.recipe}): must be fewer "
                            f"than --epochs {args.epochs}; pass --lr-warmup-epochs 0 or more epochs")
        raise FgicError(f"--lr-warmup-epochs {args.lr_warmup_epochs}: must be fewer than --epochs {args.epochs}")


def completed(cfg: dict) -> dict:
    """A config.json or checkpoint config with the options added since it was written at the values it ran with."""
    return {**LATER, **cfg}


def scaled_lr(batch_size: int, per_256: float = LR_PER_256) -> float:
    """The linear scaling rule: `per_256` (the seed's 0.1) for a global batch of 256."""
    return batch_size / 256 * per_256


def check_sizes(resize: int, crop: int, padding: int) -> None:
    """--resize, --crop and --padding fit together: the crop lies within the padded, resized image."""
    for flag, value, low in (("--resize", resize, 1), ("--crop", crop, 1), ("--padding", padding, 0)):
        if value < low:
            raise FgicError(f"{flag} {value}: must be at least {low}")
    if crop > resize + 2 * padding:
        raise FgicError(f"--crop {crop} is larger than --resize {resize} plus twice --padding {padding}")


def _resolve_amp(value: str) -> str:
    value = value.lower()
    if value in AMP_MODES or value == "auto":  # auto: resolved for the device by fgic.engine.resolve_amp
        return value
    if value in _LEGACY_AMP:
        mode = _LEGACY_AMP[value]
        if value == "1":
            print(f"fgic: notice: -a 1 meant NVIDIA apex; using native torch.amp {mode} instead", file=sys.stderr)
        return mode
    raise FgicError(f"-a/--amp {value!r}: choose auto, off, fp16 or bf16 (or the seed's 0, 1, 2)")


def run_name(args: argparse.Namespace) -> str:
    """The run folder's name: stable across restarts so that --resume auto finds it (arch, amp, the recipe unless
    the seed's, seed, note)."""
    recipe = "" if args.recipe == "seed" else f"-{args.recipe}"
    name = f"{args.arch.replace(':', '-')}-{args.amp}{recipe}-s{args.seed}"  # timm:NAME: no colon in a path
    return f"{name}-{args.note}" if args.note else name


def run_dir(args: argparse.Namespace, dataset: str) -> Path:
    """OUTPUT_DIR/DATASET/RUN_NAME: where rank 0 writes the run (fgic.ddp) and where launchers say it goes."""
    return Path(args.output_dir) / dataset / run_name(args)
