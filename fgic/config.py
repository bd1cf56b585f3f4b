"""Command-line flags of fgic.ddp and their resolution into one run config (recipe defaults, demo defaults, lr rule)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fgic.errors import FgicError

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
}
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
# Options that change what a run computes: resuming across a change of any of them is refused, and fgic.report
# groups runs by them. The world size and the worker count are not among them: fgic gives the same result on any
# layout, so a run may resume on another.
MEANING = ("dataset", "num_classes", "arch", "weights", "batch_size", "epochs", "lr", "momentum", "weight_decay",
           "label_smoothing", "resize", "crop", "padding", "seed", "amp")
# The seed's -a took 0 (off), 1 (NVIDIA apex O1) and 2 (native fp16 AMP).
_LEGACY_AMP = {"0": "off", "1": "fp16", "2": "fp16"}


def default_data_root() -> str:
    """Where the registry names (cub, aircraft, cars, demo) live: $FGIC_DATA, else ./data."""
    return os.environ.get("FGIC_DATA", "data")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The fgic.ddp parser; launchers reuse it with add_help=False as a parent."""
    p = argparse.ArgumentParser("fgic.ddp", add_help=add_help,
                                description="Train or evaluate a fine-grained classifier with the reference recipe.")
    g = p.add_argument_group("data")
    g.add_argument("-d", "--data", metavar="NAME|PATH",
                   help="cub, aircraft, cars or demo (a folder under --data-root), or a folder with train/ and test/")
    g.add_argument("--data-root", default=default_data_root(),
                   help="where registry names live (default: $FGIC_DATA or ./data)")
    g.add_argument("-w", "--workers", type=int, help="data loader workers per process (default: from the CPUs)")
    g.add_argument("--resize", type=int, help=f"resize to N x N before cropping (default {RECIPE['resize']})")
    g.add_argument("--crop", type=int, help=f"crop size (default {RECIPE['crop']})")
    g.add_argument("--padding", type=int, help=f"zero padding before the random crop (default {RECIPE['padding']})")
    g.add_argument("--check-images", default="fast", choices=("fast", "full", "off"),
                   help="before training: fast (headers and end markers), full (decode every image) or off")
    g.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out (with a count) "
                                                                  "instead of stopping")
    g.add_argument("--cache", default="auto", choices=("auto", "on", "off"),
                   help="decode and resize each split once into a memory-mapped file shared by the node's processes: "
                        "auto (when it fits in memory), on or off (default auto)")
    g.add_argument("--cache-dir", metavar="DIR", help="where the cache lives; node-local is best (default: $FGIC_CACHE "
                                                      "or fgic-cache-UID in $TMPDIR or /tmp)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", help="any torchvision classification model (default resnet50)")
    g.add_argument("--weights", metavar="imagenet|none|PATH",
                   help="imagenet (torchvision's, from the torch cache; imagenet:NAME picks e.g. IMAGENET1K_V2), "
                        "none, or a state_dict file (default imagenet)")

    g = p.add_argument_group("optimisation")
    g.add_argument("-b", "--batch-size", type=int, help="GLOBAL batch, split evenly over the processes (default 64)")
    g.add_argument("--epochs", type=int, help="epochs (default 128)")
    g.add_argument("--lr", type=float, help="learning rate (default: global batch / 256 x 0.1)")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, help="SGD weight decay (default 5e-4)")
    g.add_argument("--label-smoothing", type=float, help="label smoothing (default 0.1)")
    g.add_argument("-a", "--amp", default="off", help="mixed precision: off|fp16|bf16 (the seed's 0/1/2 are accepted)")
    g.add_argument("-s", "--seed", type=int, default=2020,
                   help="seed of the weights, order and augmentation (default 2020)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps on a GPU)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms and, on the CPU, the same BatchNorm code on 1 or N "
                        "processes (slower; for exact comparisons)")

    g = p.add_argument_group("run")
    g.add_argument("-g", "--gpu", help="GPU ids, e.g. 0 or 0,1,2,3 (several start one process each)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    g.add_argument("-n", "--note", default="", help="a word added to the run's name")
    g.add_argument("--output-dir", default="runs", help="runs go to OUTPUT_DIR/DATASET/RUN_NAME (default ./runs)")
    g.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: continue the run folder's checkpoint.pt if any; none: start over; or a checkpoint")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars per epoch to "
                                                              "RUN_DIR/tb (needs the tensorboard package)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --resume PATH or --weights PATH and write eval.json")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the recipe (or demo) defaults, normalise --amp and apply the lr rule; checks the values."""
    if not args.data:
        raise FgicError("-d/--data is required: a dataset name (cub, aircraft, cars, demo) or a folder with train/ "
                        "and test/")
    defaults = {**RECIPE, **DEMO} if args.data == "demo" else dict(RECIPE)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.amp = _resolve_amp(str(args.amp))
    if args.lr is None:
        args.lr = scaled_lr(args.batch_size)
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
    return args


def scaled_lr(batch_size: int) -> float:
    """The recipe's linear scaling rule: 0.1 for a global batch of 256."""
    return batch_size / 256 * 0.1


def check_sizes(resize: int, crop: int, padding: int) -> None:
    """--resize, --crop and --padding fit together: the crop lies within the padded, resized image."""
    for flag, value, low in (("--resize", resize, 1), ("--crop", crop, 1), ("--padding", padding, 0)):
        if value < low:
            raise FgicError(f"{flag} {value}: must be at least {low}")
    if crop > resize + 2 * padding:
        raise FgicError(f"--crop {crop} is larger than --resize {resize} plus twice --padding {padding}")


def _resolve_amp(value: str) -> str:
    value = value.lower()
    if value in AMP_MODES:
        return value
    if value in _LEGACY_AMP:
        mode = _LEGACY_AMP[value]
        if value == "1":
            print(f"fgic: notice: -a 1 meant NVIDIA apex; using native torch.amp {mode} instead", file=sys.stderr)
        return mode
    raise FgicError(f"-a/--amp {value!r}: choose off, fp16 or bf16 (or the seed's 0, 1, 2)")


def run_name(args: argparse.Namespace) -> str:
    """The run folder's name: stable across restarts so that --resume auto finds it (arch, amp, seed, note)."""
    name = f"{args.arch}-{args.amp}-s{args.seed}"
    return f"{name}-{args.note}" if args.note else name


def run_dir(args: argparse.Namespace, dataset: str) -> Path:
    """OUTPUT_DIR/DATASET/RUN_NAME: where rank 0 writes the run (fgic.ddp) and where launchers say it goes."""
    return Path(args.output_dir) / dataset / run_name(args)
