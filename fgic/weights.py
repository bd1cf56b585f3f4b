"""Pretrained weights: torchvision's ImageNet weights through the local torch cache, state_dict files, and
`python -m fgic.weights fetch ARCH...` to fill the cache on a machine with internet (timm:NAME[.TAG] too: the
Hugging Face cache, see fgic.timm_models)."""
from __future__ import annotations

import argparse
import os
import pickle
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision import models

from fgic import timm_models
from fgic.cli import run_cli
from fgic.errors import FgicError

DOWNLOAD_TIMEOUT_S = 30


def imagenet_weights(arch: str, spec: str = "imagenet"):
    """The torchvision weights enum member for `--weights imagenet[:NAME]`.

    Plain `imagenet` means IMAGENET1K_V1 where the arch has it: the weights of torchvision's legacy
    `pretrained=True`, which the reference recipe (and its published numbers) used; else the arch's DEFAULT.
    """
    try:
        enum = models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise FgicError(f"--arch {arch}: torchvision has no pretrained weights for it; use --weights none") from None
    _, _, name = spec.partition(":")
    name = name or ("IMAGENET1K_V1" if "IMAGENET1K_V1" in enum.__members__ else "DEFAULT")
    if name not in enum.__members__:
        raise FgicError(f"--weights {spec}: {arch} has {', '.join(enum.__members__)}")
    return enum[name]


def cache_file(weights) -> Path:
    """Where torch.hub keeps this weights file ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def fetch(arch: str, spec: str = "imagenet") -> Path:
    """Download the weights into the torch cache (a no-op when present); verifies torchvision's hash prefix."""
    weights = imagenet_weights(arch, spec)
    path = cache_file(weights)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        stem = path.name.split(".")[0]
        hash_prefix = stem.rsplit("-", 1)[-1] if "-" in stem else None
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:  # torch.hub writes a temporary file and moves it into place, so concurrent fetches are safe
            torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=hash_prefix,
                                           progress=sys.stderr.isatty())
        except Exception as exc:  # network errors come in many types; all mean "not here"
            raise FgicError(f"--weights {spec}: {arch}'s ImageNet weights are not in {path.parent} and could not be "
                            f"downloaded ({type(exc).__name__}); on a machine with internet run "
                            f"`python -m fgic.weights fetch {arch}` (TORCH_HOME={Path(torch.hub.get_dir()).parent}), "
                            f"or pass --weights PATH or --weights none") from None
        finally:
            socket.setdefaulttimeout(old)
    return path


def load_imagenet(arch: str, spec: str = "imagenet") -> dict:
    """torchvision's ImageNet state_dict for the arch, from the torch cache (fetched first if it is not there)."""
    return read_state_dict(fetch(arch, spec), flag="--weights")


def read_state_dict(path: str | os.PathLike, flag: str = "--weights") -> dict:
    """A model state_dict from a file, loaded with weights_only=True. Accepts a plain state_dict, an fgic checkpoint
    (its "model" entry) or a {"state_dict": ...} file; strips a DDP "module." prefix."""
    obj = safe_load(path, flag)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FgicError(f"{flag} {path}: not a model state_dict (a dict of tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def safe_load(path: str | os.PathLike, flag: str):
    """torch.load with weights_only=True: tensors and plain containers only, nothing in the file is executed."""
    if not Path(path).is_file():
        raise FgicError(f"{flag} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file fails in many ways (zip, unpickler, storage errors)
        text = str(exc).strip()
        # torch's UnpicklingError opens with a paragraph on weights_only; the unpickler's own reason follows "error:"
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        reason = (found.group(1).split(". ")[0] if found else (text.splitlines() or [type(exc).__name__])[0])[:120]
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported operand" not in reason:  # asks for code
            raise FgicError(f"{flag} {path}: refused, the file holds pickled objects other than tensors and plain "
                            f"types, which fgic does not execute ({reason})") from None
        raise FgicError(f"{flag} {path}: unreadable, truncated or not a torch file ({reason})") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("fgic.weights", description="Fill the torch cache with torchvision's ImageNet weights "
                                                            "(the Hugging Face cache with timm's, for ARCH "
                                                            "timm:NAME[.TAG]) so that offline training nodes find "
                                                            "them.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download the weights of each ARCH into the cache")
    f.add_argument("arch", nargs="+")
    f.add_argument("--weights", default="imagenet", help="imagenet (IMAGENET1K_V1 where there is one) or imagenet:NAME")
    w = sub.add_parser("path", help="print where the weights of each ARCH are (or would be) cached")
    w.add_argument("arch", nargs="+")
    w.add_argument("--weights", default="imagenet")
    args = p.parse_args(argv)
    for arch in args.arch:
        if timm_models.is_timm(arch):
            name, _, tag = arch.partition(".")
            spec = f"imagenet:{tag}" if tag else args.weights
            timm_models.check_arch(name)
            if args.cmd == "fetch":
                print(f"{arch}: {timm_models.fetch(name, spec)}")
            else:
                path, where = timm_models.cache_path(name, spec)
                print(f"{arch}: {path or where} ({'present' if path else 'missing'})")
        elif args.cmd == "fetch":
            print(f"{arch}: {fetch(arch, args.weights)}")
        else:
            path = cache_file(imagenet_weights(arch, args.weights))
            print(f"{arch}: {path} ({'present' if path.is_file() else 'missing'})")
    return 0


def cli() -> None:
    run_cli(main, "fgic.weights")


if __name__ == "__main__":
    cli()
