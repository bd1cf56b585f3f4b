"""Command-line flags of fgic.ddp and their resolution into one run config (recipe defaults, demo defaults, lr rule).

Each flag is declared once, in FLAGS: the parser, the seed recipe's and the demo's values (RECIPE, DEMO), the values
of runs that predate a flag (LATER) and what a resume must refuse to change (MEANING) are read from there."""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fgic.errors import FgicError

LR_PER_256 = 0.1  # the seed's linear scaling rule: --lr = global batch / 256 x 0.1


class OptDefaults(NamedTuple):
    lr_per_256: float  # the lr rule: --lr = global batch / 256 x this
    weight_decay: float


# --lr's rule and --weight-decay's default follow the optimizer that runs (a preset's or --opt's): the seed's SGD, and
# MAE's AdamW fine-tuning (5e-4 x batch/256, wd 0.05). AdamW at SGD's rule would step 200x too far.
OPTIMIZERS = {"sgd": OptDefaults(LR_PER_256, 5e-4), "adamw": OptDefaults(5e-4, 0.05)}
# ImageNet's per-channel statistics: how torchvision's weights and most of timm's take their inputs, and how every run
# from before --mean/--std took them.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# --recipe NAME: values for the flags left unset, over the seed's (RECIPE) and the demo's. Sources in the README
# ("Recipes"); the lr rule and weight decay are its optimizer's (OPTIMIZERS). What each preset leaves out of its source
# is said there.
RECIPES = {
    "seed": {},
    # torchvision's ResNet-50 IMAGENET1K_V2 recipe (references/classification), its pieces for fine-tuning: the seed's
    # SGD, lr rule, weight decay, sizes and epochs stay; EMA decay for FGVC's ~6k images (see the README).
    "tv-v2": {"norm_weight_decay": 0.0, "lr_warmup_epochs": 5, "lr_warmup_method": "linear", "lr_warmup_decay": 0.01,
              "auto_augment": "ta_wide", "random_erase": 0.1, "mixup_alpha": 0.2, "cutmix_alpha": 1.0,
              "model_ema": True, "model_ema_steps": 32, "model_ema_decay": 0.998},
    # MAE's ViT fine-tuning recipe (AdamW, lr 5e-4 x batch/256, wd 0.05, layer decay 0.65, 5 warmup epochs, mixup 0.8,
    # cutmix 1.0, random erasing 0.25), with TrivialAugment for RandAugment and torchvision's ViT clipping and EMA.
    "transformer": {"opt": "adamw", "norm_weight_decay": 0.0,
                    "layer_decay": 0.65, "lr_warmup_epochs": 5, "lr_warmup_method": "linear",
                    "lr_warmup_decay": 0.01, "clip_grad_norm": 1.0, "auto_augment": "ta_wide", "random_erase": 0.25,
                    "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "model_ema": True, "model_ema_steps": 32,
                    "model_ema_decay": 0.998},
}
AUTO_AUGMENT = ("none", "ta_wide", "ra", "augmix")
AMP_MODES = ("off", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
REGISTRY = ("cub", "aircraft", "cars", "nabirds", "dogs", "flowers", "pets", "demo")  # -d NAME: --data-root/NAME
# The seed's -a took 0 (off), 1 (NVIDIA apex O1) and 2 (native fp16 AMP).
_LEGACY_AMP = {"0": "off", "1": "fp16", "2": "fp16"}
UNSET = object()  # a Flag without a recipe or demo value


def dataset_name(data: str) -> str:
    """-d NAME|PATH -> the dataset's name in the run folder's path, without looking at the data."""
    return data if data in REGISTRY else Path(data).resolve().name


def default_data_root() -> str:
    """Where the registry names (REGISTRY) live: $FGIC_DATA, else ./data."""
    return os.environ.get("FGIC_DATA", "data")


class TimmWarmup(argparse.Action):
    """--lr-warmup-epochs N (torchvision's: the shape is --lr-warmup-method's), or timm's --warmup-epochs N, whose
    warmup is linear: it sets --lr-warmup-method linear where that is not given (a later one still wins). Constant,
    torchvision's default, would hold a timm user's lr at 1% for N epochs, then jump to the full lr."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        if option_string == "--warmup-epochs" and values and getattr(namespace, "lr_warmup_method", None) is None:
            namespace.lr_warmup_method = "linear"


@dataclass(frozen=True, kw_only=True)
class Flag:
    """One fgic.ddp flag: argparse's arguments, whether it changes what a run computes, where its value comes from
    when left unset, and its help, in which {default} is that value (RECIPE's, else argparse's)."""
    names: tuple[str, ...]
    # 0: a resume may change it. N: it changes what the run computes (a resume across a change is refused, fgic.report
    # groups runs by it), and N is its place in MEANING: the report's columns and a refused resume's list.
    meaning: int
    help: str
    recipe: Any = UNSET  # the seed recipe's value when left unset (argparse's default stays None: "unset")
    demo: Any = UNSET  # -d demo's value when left unset, over the recipe's
    later: bool = False  # added after the seed: a config without it ran with its recipe value (LATER)
    before: Any = UNSET  # ... or with this value, where that is not the recipe's
    default: Any = None  # argparse's; a callable is called when the parser is built
    type: Any = None
    choices: tuple | None = None
    action: Any = None
    metavar: str | None = None
    nargs: str | None = None
    const: Any = None
    dest: str | None = None

    @property
    def key(self) -> str:
        """The attribute of the parsed flags (argparse's dest)."""
        return self.dest or next(n for n in self.names if n.startswith("--"))[2:].replace("-", "_")

    @property
    def unset(self) -> Any:
        """The value the flag takes when left unset (before -d demo, --recipe and the lr rule)."""
        return self.default if self.recipe is UNSET else self.recipe

    def arguments(self) -> dict:
        """add_argument's keyword arguments."""
        given = {k: getattr(self, k) for k in ("type", "choices", "action", "metavar", "nargs", "const", "dest")}
        if self.default is not None:
            given["default"] = self.default() if callable(self.default) else self.default
        return {**{k: v for k, v in given.items() if v is not None}, "help": self.help.format(default=self.unset)}


# Every flag, in the help's order; `meaning` says whether a resume may change it. Flags of torchvision's classification
# reference and timm's train.py are aliases of fgic's. The later ones are off in the seed's recipe (torchvision's
# reference names and defaults).
FLAGS = {
    "data": (
        Flag(names=("-d", "--data", "--data-path"), metavar="NAME|PATH", meaning=0,  # MEANING has its dataset
             help=f"{', '.join(REGISTRY)} (a folder under --data-root), or a folder with train/ and test/"),
        Flag(names=("--data-root",), default=default_data_root, meaning=0,
             help="where registry names live (default: $FGIC_DATA or ./data)"),
        Flag(names=("-w", "-j", "--workers"), type=int, meaning=0,  # None: from the CPUs of each process
             help="data loader workers per process (default: from the CPUs)"),
        Flag(names=("--resize",), type=int, recipe=512, demo=72, meaning=9,
             help="resize to N x N before cropping (default {default}; with --crop C given alone, C x 512/448, the "
                  "recipe's ratio, as timm's crop_pct 0.875)"),
        Flag(names=("--crop", "--train-crop-size", "--img-size"), type=int, recipe=448, demo=64, meaning=10,
             help="crop size, training and test (default {default})"),
        Flag(names=("--padding",), type=int, recipe=8, demo=4, meaning=11,
             help="zero padding before the random crop (default {default})"),
        Flag(names=("--check-images",), default="fast", choices=("fast", "full", "off"), meaning=0,
             help="before training: fast (headers and end markers), full (decode every image) or off "
                  "(default {default})"),
        Flag(names=("--skip-bad-images",), action="store_true", meaning=0,
             help="leave unreadable images out (with a count) instead of stopping"),
        Flag(names=("--auto-augment", "--aa"), choices=AUTO_AUGMENT, recipe="none", later=True, meaning=25,
             help="per-image policy: TrivialAugment (ta_wide), RandAugment (ra), AugMix (default {default})"),
        Flag(names=("--random-erase", "--reprob"), type=float, metavar="P", recipe=0.0, later=True, meaning=26,
             help="random erasing probability (default {default:g})"),
        Flag(names=("--mixup-alpha", "--mixup"), type=float, recipe=0.0, later=True, meaning=27,
             help="mixup's Beta(alpha, alpha); partners from the whole train set (default {default:g}: off)"),
        Flag(names=("--cutmix-alpha", "--cutmix"), type=float, recipe=0.0, later=True, meaning=28,
             help="cutmix's Beta(alpha, alpha) (default {default:g}: off; with mixup, half the samples each)"),
        Flag(names=("--mean",), type=float, nargs=3, metavar="X", later=True, before=list(IMAGENET_MEAN), meaning=31,
             help="the input normalisation's mean, RGB in [0, 1] (default: what --weights were trained with: timm's "
                  "pretrained config, torchvision's weights' transforms, a weights file's fgic run; else ImageNet's)"),
        Flag(names=("--std",), type=float, nargs=3, metavar="X", later=True, before=list(IMAGENET_STD), meaning=32,
             help="the input normalisation's standard deviation, RGB (default: as --mean's)"),
        Flag(names=("--cache",), default="auto", choices=("auto", "on", "off"), meaning=0,
             help="decode and resize each split once into a memory-mapped file shared by the node's processes: "
                  "auto (when it fits in memory), on or off (default {default})"),
        Flag(names=("--cache-dir",), metavar="DIR", meaning=0,
             help="where the cache lives; node-local is best (default: $FGIC_CACHE or fgic-cache-UID in $TMPDIR or "
                  "/tmp)"),
    ),
    "model": (
        Flag(names=("--arch", "--model"), recipe="resnet50", demo="resnet18", meaning=1,
             help="any torchvision classification model, or timm:NAME with timm installed (default {default})"),
        Flag(names=("--pretrained",), dest="weights", action="store_const", const="imagenet", meaning=2,
             help="the same as --weights imagenet"),
        Flag(names=("--weights",), metavar="imagenet|none|PATH", recipe="imagenet", demo="none", meaning=2,
             help="imagenet (torchvision's, from the torch cache; imagenet:NAME picks e.g. IMAGENET1K_V2; for timm: "
                  "the default tag from the Hugging Face cache, imagenet:TAG another), none, or a state_dict file "
                  "(default {default})"),
        Flag(names=("--stochastic-depth", "--drop-path"), type=float, metavar="P", later=True, meaning=29,
             help="stochastic depth rate of the deepest block (torchvision's stochastic_depth_prob, timm's "
                  "drop_path_rate; default: the arch's)"),  # None: the arch's own rate
        Flag(names=("--dropout", "--drop"), type=float, metavar="P", later=True, meaning=30,
             help="dropout rate (torchvision's dropout, timm's drop_rate; default: the arch's)"),
    ),
    "optimisation": (
        Flag(names=("-b", "--batch-size"), type=int, recipe=64, demo=32, meaning=3,
             help="GLOBAL batch, split evenly over the processes (default {default})"),
        Flag(names=("--epochs",), type=int, recipe=128, demo=8, meaning=4, help="epochs (default {default})"),
        Flag(names=("--lr",), type=float, meaning=5,  # None: the lr rule (scaled_lr)
             help="learning rate (default: global batch / 256 x " + ", ".join(
                 f"{o.lr_per_256:g} for {name}" for name, o in OPTIMIZERS.items()) + ")"),
        Flag(names=("--momentum",), type=float, recipe=0.9, meaning=6, help="SGD momentum (default {default})"),
        Flag(names=("--weight-decay", "--wd"), type=float, meaning=7,  # None: the optimizer's (OPTIMIZERS)
             help="weight decay (default: " + ", ".join(f"{o.weight_decay:g} for {name}"
                                                         for name, o in OPTIMIZERS.items()) + ")"),
        Flag(names=("--label-smoothing", "--smoothing"), type=float, recipe=0.1, meaning=8,
             help="label smoothing (default {default:g})"),
        Flag(names=("--recipe",), choices=tuple(RECIPES), recipe="seed", later=True, meaning=14,
             help="fill the flags left unset from a named set: {default} (the default), tv-v2 or transformer (see "
                  "README 'Recipes')"),
        Flag(names=("--opt",), choices=("sgd", "adamw"), recipe="sgd", later=True, meaning=15,
             help="optimizer (default {default})"),
        Flag(names=("--norm-weight-decay",), type=float, later=True, meaning=16,  # None: --weight-decay for all
             help="weight decay of norm layers and biases (default: --weight-decay)"),
        Flag(names=("--layer-decay",), type=float, later=True, meaning=17,
             help="layer-wise lr decay: block k of L gets lr x X^(L+1-k), the head lr (ViT, Swin, ConvNeXt, "
                  "EfficientNet, MobileNet, RegNet, ResNet, MaxViT, MNASNet, ShuffleNet, timm models; default off)"),
        Flag(names=("--lr-warmup-epochs", "--warmup-epochs"), type=int, recipe=0, later=True, meaning=18,
             action=TimmWarmup, help="epochs of lr warmup, per step, before the cosine (default {default}; timm's "
                                     "--warmup-epochs warms up linearly, as in timm)"),
        Flag(names=("--lr-warmup-method",), choices=("linear", "constant"), recipe="constant", later=True,
             meaning=19, help="warmup shape (default {default})"),
        Flag(names=("--lr-warmup-decay",), type=float, recipe=0.01, later=True, meaning=20,
             help="warmup's first lr factor (default {default:g})"),
        Flag(names=("--clip-grad-norm", "--clip-grad"), type=float, later=True, meaning=21,
             help="clip the global gradient norm to X (default off; 0: off, as to undo a --recipe's)"),
        Flag(names=("--model-ema",), action=argparse.BooleanOptionalAction, recipe=False, later=True, meaning=22,
             help="also keep and evaluate an exponential moving average of the weights"),
        Flag(names=("--model-ema-decay",), type=float, recipe=0.99998, later=True, meaning=23,
             help="EMA decay, adjusted for the global batch and --model-ema-steps as torchvision's "
                  "(default {default:g})"),
        Flag(names=("--model-ema-steps",), type=int, recipe=32, later=True, meaning=24,
             help="steps between EMA updates (default {default})"),
        Flag(names=("-a", "--amp"), default="auto", nargs="?", const="fp16", metavar="auto|off|fp16|bf16",
             meaning=13,
             help="mixed precision (default {default}: bf16 on a GPU that has it, fp16 on one without, off on the "
                  "CPU; a bare --amp is fp16, as in torchvision's reference and timm; the seed's 0/1/2 are "
                  "accepted)"),
        Flag(names=("-s", "--seed"), type=int, default=2020, meaning=12,
             help="seed of the weights, order and augmentation (default {default})"),
        Flag(names=("--compile",), action=argparse.BooleanOptionalAction, default=False, meaning=0,
             help="torch.compile the model (slow start, faster steps on a GPU; default off)"),
        Flag(names=("--compile-mode",), default="default", choices=COMPILE_MODES, meaning=0,
             help="torch.compile's mode with --compile: its speed only, not what is computed (default {default})"),
        Flag(names=("--sync-bn",), action="store_true", meaning=0,
             help="accepted for torchvision's reference: fgic always synchronises BatchNorm over the global batch "
                  "when several processes train"),
        Flag(names=("--deterministic",), action="store_true", meaning=0,
             help="deterministic algorithms and, on the CPU, the same BatchNorm code on 1 or N processes (slower; "
                  "for exact comparisons)"),
    ),
    "run": (
        Flag(names=("-g", "--gpu"), meaning=0,
             help="GPU ids, e.g. 0 or 0,1,2,3 (several start one process each)"),
        Flag(names=("--device",), default="auto", choices=("auto", "cpu", "cuda"), meaning=0,
             help="default: cuda when available"),
        Flag(names=("-n", "--note"), default="", meaning=0,  # fgic.report groups by it too
             help="a word added to the run's name"),
        Flag(names=("--output-dir", "--output"), default="runs", meaning=0,
             help="runs go to OUTPUT_DIR/DATASET/RUN_NAME (default ./{default})"),
        Flag(names=("--resume",), default="auto", metavar="auto|none|PATH", meaning=0,
             help="auto: continue the run folder's checkpoint.pt if any; none: start over; or a checkpoint"),
        Flag(names=("--tensorboard",), action="store_true", meaning=0,
             help="also write TensorBoard scalars per epoch to RUN_DIR/tb (needs the tensorboard package)"),
        Flag(names=("--wandb",), action="store_true", meaning=0,
             help="also log to Weights & Biases from rank 0, one W&B run per run folder across requeues (pip "
                  "install wandb; WANDB_MODE=offline, then `wandb sync`, works offline)"),
        Flag(names=("--wandb-project",), default="fgic", meaning=0,
             help="the W&B project (default {default})"),
        Flag(names=("--wandb-entity",), meaning=0, help="the W&B team or user (default: your W&B default)"),
        Flag(names=("--wandb-group",), meaning=0,
             help="the W&B group (default: none; a sweep's runs get the sweep's)"),
        Flag(names=("--eval-only", "--test-only"), action="store_true", meaning=0,
             help="evaluate --resume PATH or --weights PATH and write eval.json"),
    ),
}
EVERY_FLAG = tuple(flag for group in FLAGS.values() for flag in group)
# The reference recipe. Flags left unset take these values (or DEMO's, for -d demo).
RECIPE = {f.key: f.recipe for f in EVERY_FLAG if f.recipe is not UNSET}
# -d demo: small enough to finish in a few minutes on a laptop CPU, from scratch (no download).
DEMO = {f.key: f.demo for f in EVERY_FLAG if f.demo is not UNSET}
# Options added later, off in the seed's recipe. A run that predates them ran with these values: `completed` fills
# them into an older config.json or checkpoint.
LATER = {f.key: f.unset if f.before is UNSET else f.before for f in EVERY_FLAG if f.later}
# Options that change what a run computes: resuming across a change of any of them is refused, and fgic.report
# groups runs by them. The world size and the worker count are not among them: fgic gives the same result on any
# layout, so a run may resume on another. The dataset and its class count stand for -d (the data may move).
MEANING = ("dataset", "num_classes", *dict.fromkeys(f.key for f in sorted(EVERY_FLAG, key=lambda f: f.meaning)
                                                   if f.meaning))
INCIDENTAL = tuple(dict.fromkeys(f.key for f in EVERY_FLAG if not f.meaning))  # a resume may change these


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
    """The fgic.ddp parser, built from FLAGS; launchers reuse it with add_help=False as a parent."""
    p = Parser("fgic.ddp", add_help=add_help,
               description="Train or evaluate a fine-grained classifier with the reference recipe. Flags of "
                           "torchvision's classification reference and timm's train.py are accepted under their "
                           "names too (shown beside fgic's).")
    for title, flags in FLAGS.items():
        group = p.add_argument_group(title)
        for flag in flags:
            group.add_argument(*flag.names, **flag.arguments())
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """fgic.ddp's command line (sys.argv's when None), resolved and checked."""
    return resolve(get_args_parser().parse_args(argv))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the recipe (or demo) defaults, normalise --amp and apply the lr rule; checks the values."""
    if not args.data:
        raise FgicError(f"-d/--data is required: a dataset name ({', '.join(REGISTRY)}) or a folder with train/ "
                        f"and test/")
    if getattr(args, "recipe", None) is None:
        args.recipe = RECIPE["recipe"]
    preset = RECIPES[args.recipe]
    defaults = {**RECIPE, **(DEMO if args.data == "demo" else {}), **preset}
    from_preset = {key for key in preset if getattr(args, key, None) is None}
    given = {key for key, value in vars(args).items() if value is not None}  # by the user: before the defaults
    if args.resize is None and args.crop is not None:  # --img-size 224 alone: a 512 px resize left 19% in its crops
        args.resize = round(args.crop * RECIPE["resize"] / RECIPE["crop"])
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.amp = _resolve_amp(str(args.amp))
    rule = OPTIMIZERS[args.opt]
    if args.weight_decay is None:
        args.weight_decay = rule.weight_decay
    if args.lr is None:
        args.lr = scaled_lr(args.batch_size, rule.lr_per_256)
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
    if args.std is not None and min(args.std) <= 0:
        raise FgicError(f"--std {' '.join(map(str, args.std))}: each must be positive")
    if not 0 <= args.label_smoothing < 1:
        raise FgicError(f"--label-smoothing {args.label_smoothing}: must be in [0, 1)")
    if args.lr <= 0:
        raise FgicError(f"--lr {args.lr}: must be positive")
    if args.clip_grad_norm == 0:  # off: how a preset's clipping is turned off
        args.clip_grad_norm = None
    check_recipe(args, from_preset)
    check_used(args, given, from_preset)
    return args


def check_used(args: argparse.Namespace, given: set, from_preset: set = frozenset()) -> None:
    """A flag the user gave that the run would not use is refused: a sweep over it would train identical runs under
    different names, and a forgotten switch (--model-ema, --wandb) would go unnoticed."""
    def source(key: str) -> str:
        return f" (from --recipe {args.recipe})" if key in from_preset else ""
    no_warmup = f"used with a warmup only; --lr-warmup-epochs is 0{source('lr_warmup_epochs')}"
    needs = (("momentum", args.opt == "sgd", f"SGD's; --opt is {args.opt}{source('opt')}", "add --opt sgd"),
             ("model_ema_decay", args.model_ema, "used with --model-ema only", "add --model-ema"),
             ("model_ema_steps", args.model_ema, "used with --model-ema only", "add --model-ema"),
             ("lr_warmup_method", args.lr_warmup_epochs > 0, no_warmup, "give --lr-warmup-epochs"),
             ("lr_warmup_decay", args.lr_warmup_epochs > 0, no_warmup, "give --lr-warmup-epochs"),
             ("wandb_entity", args.wandb, "used with --wandb only", "add --wandb"),
             ("wandb_group", args.wandb, "used with --wandb only", "add --wandb"))
    for key, used, why, fix in needs:
        if key in given and not used:
            flag = next(f.names[0] for f in EVERY_FLAG if f.key == key)
            raise FgicError(f"{flag} {getattr(args, key)}: {why}; {fix}, or leave it out")


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
        raise FgicError(f"--clip-grad-norm {args.clip_grad_norm}: must be positive, or 0 for no clipping")
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


def as_flags(cfg: dict, keys) -> str:
    """A config's values of `keys` as a command line gives them, e.g. "--crop 448 --mean 0.5 0.5 0.5"."""
    def value(v) -> str:
        return " ".join(map(value, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
    return " ".join(f"--{k.replace('_', '-')} {value(cfg[k])}" for k in keys)


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
