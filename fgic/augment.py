"""Per-sample augmentation: crop offset and flip drawn from (seed, epoch, sample index), so no process or worker
count changes them."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CropFlip(NamedTuple):
    top: int   # offset of the crop in the zero-padded image
    left: int
    flip: bool


def sample_params(seed: int, epoch: int, index: int, size: int, crop: int, padding: int) -> CropFlip:
    """The random crop and flip of one sample in one epoch: a pure function of its key, the same on every layout."""
    rng = np.random.default_rng((seed, epoch, index))
    span = size + 2 * padding - crop
    top, left = (int(v) for v in rng.integers(0, span + 1, size=2))
    return CropFlip(top, left, bool(rng.integers(0, 2)))


def resize(img: Image.Image, size: int) -> torch.Tensor:
    """The recipe's Resize((size, size)) with PIL's bilinear filter, as a uint8 CHW tensor."""
    img = F.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.pil_to_tensor(img)


def crop_flip(image: torch.Tensor, p: CropFlip, crop: int, padding: int) -> torch.Tensor:
    """RandomCrop(crop, padding) then RandomHorizontalFlip with the given draw. F.crop zero-fills outside the image,
    which equals cropping the zero-padded image at (top, left)."""
    out = F.crop(image, p.top - padding, p.left - padding, crop, crop)
    return F.horizontal_flip(out) if p.flip else out


def crop_flip_batch(images: torch.Tensor, params: torch.Tensor, crop: int, padding: int) -> torch.Tensor:
    """crop_flip of each image of a uint8 NCHW batch, on the batch's device, `params` holding (top, left, flip) rows.
    A GPU does it in one gather; the CPU slices image by image (far faster there than a gather)."""
    if images.device.type != "cpu":
        return gather_crops(images, params, crop, padding)
    return torch.stack([crop_flip(image, CropFlip(*p), crop, padding) for image, p in zip(images, params.tolist())])


def gather_crops(images: torch.Tensor, params: torch.Tensor, crop: int, padding: int) -> torch.Tensor:
    """crop_flip_batch as one pad and one gather. The result is NCHW with channels_last strides (what the
    convolutions want on a GPU)."""
    padded = torch.nn.functional.pad(images, (padding,) * 4) if padding else images
    steps = torch.arange(crop, device=images.device)
    top, left, flip = params.to(images.device, non_blocking=True).long().unbind(1)
    rows = top[:, None] + steps
    cols = left[:, None] + torch.where(flip[:, None].bool(), crop - 1 - steps, steps)
    batch = torch.arange(len(images), device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def center_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    return F.center_crop(image, [crop, crop])


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> float, ImageNet-normalised, on the batch's own device (the host only moves bytes)."""
    return batch.float().sub_(_per_channel(IMAGENET_MEAN, batch.device)).div_(_per_channel(IMAGENET_STD, batch.device))


def _per_channel(values, device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1) float32 tensor of values x 255, filled on the device itself: copying a tensor from pageable
    host memory to a GPU waits for it, every batch."""
    exact = (torch.tensor(values) * 255).tolist()  # float32 rounding, as a host tensor of them would hold
    return torch.stack([torch.full((), v, device=device) for v in exact]).view(1, 3, 1, 1)
