"""A trained model out of a run folder or a weights file, with what classifying an image takes: the class names and
the run's test transform (fgic.predict and fgic.export)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fgic import augment, images, models, optim
from fgic.config import completed
from fgic.errors import FgicError
from fgic.jsonfile import read_object
from fgic.runlog import BEST, BEST_EMA, CHECKPOINT
from fgic.weights import read_state_dict, safe_load

SOURCE = "RUN_DIR|CHECKPOINT"


@dataclass(frozen=True)
class Trained:
    model: nn.Module  # on the CPU, in eval mode
    classes: list[str]
    config: dict  # the run's config.json
    weights: str  # what was loaded, e.g. "runs/cub/x/checkpoint.pt (EMA)"

    @property
    def resize(self) -> int:
        return self.config["resize"]

    @property
    def crop(self) -> int:
        return self.config["crop"]

    @property
    def crop_offset(self) -> int:
        """Where torchvision's center_crop takes the crop, from the top left; a crop larger than the image (as far as
        --padding allows) holds it zero-padded, at (crop - resize) // 2."""
        if self.crop <= self.resize:
            return int(round((self.resize - self.crop) / 2.0))
        return -((self.crop - self.resize) // 2)

    @property
    def normalization(self) -> augment.Normalization:
        return augment.Normalization(tuple(self.config["mean"]), tuple(self.config["std"]))

    def preprocessing(self) -> dict:
        """The test transform as numbers, for code without fgic: Resize((resize, resize)) with PIL's bilinear filter,
        the centre crop x crop at (offset, offset), x / 255, then (x - mean) / std per RGB channel, NCHW."""
        return {"resize": [self.resize, self.resize], "interpolation": "PIL bilinear (antialiased)",
                "crop": [self.crop, self.crop], "crop_offset": self.crop_offset,
                "scale": 1 / 255, "mean": list(self.normalization.mean), "std": list(self.normalization.std),
                "channels": "RGB", "layout": "NCHW float32"}


def class_names(config: dict, where: Path) -> list[str]:
    """The run's class names: config.json's (runs since the class names are kept there), else the dataset's train
    folder, when it is still where the run found it."""
    if isinstance(config.get("classes"), list):
        return config["classes"]
    train = Path(str(config.get("data_path", ""))) / "train"
    if train.is_dir():
        names = images.split_classes(train)
        if len(names) == config.get("num_classes"):
            return names
    raise FgicError(f"{where}: config.json names no classes and the dataset's train/ ({train}) is gone; run from a "
                    f"machine that has the dataset at that path")


def resolve(source: str) -> tuple[Path, Path]:
    """RUN_DIR or a weights file -> (the weights file, the run's config.json)."""
    path = Path(source)
    if path.is_dir():
        weights, config = path / CHECKPOINT, path / "config.json"
        if not config.is_file():
            raise FgicError(f"{SOURCE} {source}: no config.json; give an fgic run folder (OUTPUT_DIR/DATASET/RUN_NAME) "
                            f"or a checkpoint in one")
        if not weights.is_file():
            others = [n for n in (BEST, BEST_EMA) if (path / n).is_file()]
            hint = f"give {path / others[0]}" if others else "the run saved no weights yet"
            raise FgicError(f"{SOURCE} {source}: no {CHECKPOINT}; {hint}")
        return weights, config
    if not path.is_file():
        raise FgicError(f"{SOURCE} {source}: no such file or folder")
    config = path.parent / "config.json"
    if not config.is_file():
        raise FgicError(f"{SOURCE} {source}: no config.json beside it; give a weights file inside its run folder")
    return path, config


def load(source: str, ema: bool | None = None) -> Trained:
    """The model of RUN_DIR (its checkpoint.pt) or of a checkpoint, best.pt or best_ema.pt in a run folder. `ema`:
    the checkpoint's EMA weights (True), its plain ones (False), or the EMA's where there are some (None)."""
    weights, config_path = resolve(source)
    config = completed(read_object(config_path))  # a run from before --mean/--std: ImageNet's
    classes = class_names(config, config_path)
    obj = safe_load(weights, SOURCE)
    is_checkpoint = isinstance(obj, dict) and {"model", "config"} <= obj.keys()
    has_ema = is_checkpoint and isinstance(obj.get("model_ema"), dict)
    ema_file = Path(weights).name == BEST_EMA  # the EMA's weights alone
    if ema is False and ema_file:
        raise FgicError(f"--no-ema: {weights} holds the EMA's weights only; give {Path(weights).parent / BEST} or the "
                        f"run folder for the plain ones")
    if ema and not has_ema and not ema_file:
        raise FgicError(f"--ema: {weights} holds no EMA weights (trained without --model-ema, or not a checkpoint); "
                        f"leave --ema out")
    use_ema = has_ema and ema is not False
    if use_ema:
        state = optim.exact_buffers({k[len(optim.EMA_PREFIX):]: v for k, v in obj["model_ema"].items()
                                     if k.startswith(optim.EMA_PREFIX)}, obj["model"])
    else:
        state = read_state_dict(weights, SOURCE)
    del obj
    model = models.build(config["arch"], len(classes), "none", crop=config["crop"], keyed_drop=False,
                         stochastic_depth=config.get("stochastic_depth"), dropout=config.get("dropout"))
    if ema_file:  # an EMA's integer buffers are the model's constants (optim.exact_buffers)
        state = optim.exact_buffers(state, model.state_dict())
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise FgicError(f"{SOURCE} {weights}: does not fit the run's --arch {config['arch']} with {len(classes)} "
                        f"classes ({str(exc).splitlines()[0][:120]})") from None
    name = f"{weights} (EMA)" if use_ema else str(weights)
    return Trained(model.eval(), classes, config, name)


def to_input(images: list[torch.Tensor], norm: augment.Normalization) -> torch.Tensor:
    """uint8 CHW crops -> the normalised float NCHW batch the model takes (fgic.engine's test path)."""
    return augment.normalize(torch.stack(images), norm)
