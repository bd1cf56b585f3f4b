"""timm backbones, `--arch timm:NAME` with the optional extra timm: built for the crop with the --drop-path and
--dropout rates, pretrained weights (`--weights imagenet[:TAG]`) from the Hugging Face cache, which
`python -m fgic.weights fetch timm:NAME[.TAG]` fills on a machine with internet.

timm is imported where it is used, not at the top: it is optional, and `import timm` costs about 4 s."""
from __future__ import annotations

import difflib
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from fgic.errors import FgicError

PREFIX = "timm:"
IMAGENET_CLASSES = 1000
# The file names timm's hub loader tries, in its order (timm.models._hub.load_state_dict_from_hf)
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
# huggingface_hub retries an unreachable host 5 times (24 s a file on this machine, with a warning each): a connection
# attempt first, with torchvision weights' timeout, tells a compute node without internet at once
CONNECT_TIMEOUT_S = 30


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def require():
    try:
        import timm  # noqa: PLC0415  (timm: an optional extra)
    except ImportError:
        raise FgicError("--arch timm:NAME needs the optional extra timm: pip install timm") from None
    return timm


def check_arch(arch: str) -> None:
    timm, name = require(), arch[len(PREFIX):]
    if "." in name:
        raise FgicError(f"--arch {arch}: give the architecture without its tag; the tag goes in --weights "
                        f"imagenet:{name.partition('.')[2]}")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else "see timm.list_models()"
        raise FgicError(f"--arch {arch}: not a timm model; {hint}")


def construct(arch: str, crop: int | None = None, stochastic_depth: float | None = None,
              dropout: float | None = None, num_classes: int = IMAGENET_CLASSES, **pretrained) -> nn.Module:
    """timm's model for crop x crop images (img_size, for the models that are built for one size: ViTs, Swin,
    MaxViT...; a CNN takes any), with drop_path_rate and drop_rate where given. An arch whose rate would not be
    a DropPath or nn.Dropout module gets one line: timm's ResNets and EfficientNets apply their head dropout as a
    function, which fgic cannot key per sample (fgic.drop)."""
    timm, name = require(), arch[len(PREFIX):]
    opts = {"num_classes": num_classes, **pretrained}
    if stochastic_depth is not None:
        opts["drop_path_rate"] = stochastic_depth
    if dropout is not None:
        opts["drop_rate"] = dropout
    try:
        model = timm.create_model(name, **opts, **({"img_size": crop} if crop else {}))
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        model = timm.create_model(name, **opts)
    if stochastic_depth and not any(type(m).__name__ == "DropPath" and m.drop_prob > 0 for m in model.modules()):
        raise FgicError(f"--stochastic-depth: timm's {name} has no DropPath layers; leave it out")
    if dropout and not any(type(m) is nn.Dropout and m.p == dropout for m in model.modules()):
        raise FgicError(f"--dropout: timm's {name} has no dropout layer at that rate (its dropout, if any, is a "
                        f"function fgic cannot key per sample); leave it out")
    return model


def build(arch: str, num_classes: int, weights: str, crop: int | None = None, stochastic_depth: float | None = None,
          dropout: float | None = None) -> tuple[nn.Module, list[str]]:
    """timm's model with a num_classes head and, for `imagenet[:TAG]`, the tag's weights from the local cache
    (timm's own loading: its checkpoint filter resamples position embeddings, a head for another class count is
    left out); with a notice of what was adapted. Returns the model and its head's names."""
    if weights.split(":")[0] != "imagenet":
        model = construct(arch, crop, stochastic_depth, dropout, num_classes)
        return model, heads(model)
    cfg = pretrained_cfg(arch, weights)
    path = fetch(arch, weights)
    state = read_hub_file(path)
    model = construct(arch, crop, stochastic_depth, dropout, num_classes, pretrained=True, pretrained_cfg=cfg,
                      pretrained_cfg_overlay={"state_dict": state})
    for kept in (model.pretrained_cfg, getattr(model, "default_cfg", None)):  # not a second copy of the weights
        if isinstance(kept, dict):
            kept.pop("state_dict", None)
    names, own = heads(model), model.state_dict()
    what = [f"head ({', '.join(names)}) new for {num_classes} classes"] if num_classes != cfg.num_classes else []
    resampled = [f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and own[k].shape != v.shape and k.rpartition(".")[0] not in names]
    if resampled:
        what.append(f"resampled {', '.join(resampled)}")
    if what:
        print(f"fgic: notice: {arch}.{cfg.tag}'s weights: {'; '.join(what)}", file=sys.stderr)
    return model, names


def heads(model: nn.Module) -> list[str]:
    """The names of the model's classifier layers (timm's pretrained_cfg "classifier")."""
    classifier = model.pretrained_cfg.get("classifier") or []
    return [classifier] if isinstance(classifier, str) else list(classifier)


def pretrained_cfg(arch: str, spec: str = "imagenet"):
    """timm's pretrained config for `--weights imagenet` (the arch's default tag) or `imagenet:TAG`."""
    timm, name = require(), arch[len(PREFIX):]
    tag = spec.partition(":")[2]
    try:
        cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}" if tag else name, allow_unregistered=True)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{name}.*")]
        if not tags:
            raise FgicError(f"--weights {spec}: timm has no pretrained weights for {name}; use --weights none")
        raise FgicError(f"--weights {spec}: timm's {name} has the tags {', '.join(tags)} (imagenet means {tags[0]})")
    return cfg


def split_hub_id(hub_id: str) -> tuple[str, str | None]:
    """timm's hf_hub_id, "org/name" or "org/name@revision"."""
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def cache_path(arch: str, spec: str = "imagenet") -> tuple[Path | None, str]:
    """The cached weights file of the tag, or None; and where it is (or would be) cached, in words."""
    from huggingface_hub import constants, try_to_load_from_cache  # noqa: PLC0415  (timm's dependency)
    cfg = pretrained_cfg(arch, spec)
    if cfg.hf_hub_id:
        repo, revision = split_hub_id(cfg.hf_hub_id)
        for filename in (HUB_FILES[0], cfg.hf_hub_filename or HUB_FILES[1]):
            found = try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(found, str):
                return Path(found), found
        return None, f"{constants.HF_HUB_CACHE} (HF_HOME={constants.HF_HOME})"
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
    return (path if path.is_file() else None), str(path)


def fetch(arch: str, spec: str = "imagenet") -> Path:
    """The tag's weights file: from the local cache, else downloaded into it (the Hugging Face cache, or the torch
    hub's for the few timm weights that are only a URL)."""
    path, where = cache_path(arch, spec)
    if path is not None:
        return path
    cfg = pretrained_cfg(arch, spec)
    try:
        return download(cfg)
    except Exception as exc:  # network errors come in many types; all mean "not here"
        raise FgicError(f"--weights {spec}: {arch}.{cfg.tag}'s weights are not in {where} and could not be downloaded "
                        f"({type(exc).__name__}); on a machine with internet run `python -m fgic.weights fetch "
                        f"{arch}.{cfg.tag}`, or pass --weights PATH or --weights none") from None


def download(cfg) -> Path:
    from huggingface_hub import constants, hf_hub_download  # noqa: PLC0415  (timm's dependency)
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError  # noqa: PLC0415
    host = urlparse(constants.ENDPOINT if cfg.hf_hub_id else cfg.url)
    socket.create_connection((host.hostname, host.port or 443), timeout=CONNECT_TIMEOUT_S).close()
    if not cfg.hf_hub_id:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(cfg.url, str(path), progress=sys.stderr.isatty())
        return path
    repo, revision = split_hub_id(cfg.hf_hub_id)
    try:
        return Path(hf_hub_download(repo, HUB_FILES[0], revision=revision))
    except EntryNotFoundError as exc:
        if isinstance(exc, LocalEntryNotFoundError):  # no connection after all, not a missing file
            raise
        return Path(hf_hub_download(repo, cfg.hf_hub_filename or HUB_FILES[1], revision=revision))


def read_hub_file(path: Path) -> dict:
    """A weights file of the hub: safetensors, or a torch file read with weights_only=True."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415  (timm's dependency)
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
