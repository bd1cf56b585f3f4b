"""Per-sample augmentation: the crop, flip, policy (TrivialAugment, RandAugment, AugMix), random erasing and the
mixup/cutmix partner and ratio of a sample are drawn from (seed, epoch, sample index), so no process or worker count
changes them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from fgic.batch import Batch
from fgic.config import IMAGENET_MEAN, IMAGENET_STD
from fgic.drop import M32, mix32


class Normalization(NamedTuple):
    """The per-channel (x / 255 - mean) / std that a model's inputs get: the statistics its pretrained weights were
    trained with (fgic.models.normalization)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def fill(self) -> tuple[int, ...]:
        """The mean colour as uint8: random erasing's fill (the host augments bytes), within half a level of
        torchvision's value=0 after Normalize (ImageNet's: 0.006 at most)."""
        return tuple(round(255 * m) for m in self.mean)


IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD)
# The streams drawn from one (seed, epoch, index) key besides the crop and flip (whose stream, the key alone, is the
# seed recipe's and stays as it was).
POLICY_STREAM, MIX_STREAM, DROP_STREAM = 1, 2, 3  # DROP_STREAM: fgic.drop's masks
MIX_SWITCH_PROB = 0.5  # with both alphas: cutmix for half the samples (timm's switch_prob, torchvision's RandomChoice)


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


def normalize(batch: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """uint8 NCHW batch -> float, normalised, on the batch's own device (the host only moves bytes)."""
    return batch.float().sub_(_per_channel(norm.mean, batch.device)).div_(_per_channel(norm.std, batch.device))


def _per_channel(values, device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1) float32 tensor of values x 255, filled on the device itself: copying a tensor from pageable
    host memory to a GPU waits for it, every batch."""
    exact = (torch.tensor(values) * 255).tolist()  # float32 rounding, as a host tensor of them would hold
    return torch.stack([torch.full((), v, device=device) for v in exact]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class Extra:
    """The augmentations beyond the seed's crop and flip (all off by default)."""
    auto_augment: str = "none"
    random_erase: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    erase_fill: tuple[int, ...] = IMAGENET.fill

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def per_image(self) -> bool:
        return self.auto_augment != "none" or self.random_erase > 0

    def policy(self) -> v2.Transform | None:
        """The per-image transforms after the crop and flip, on uint8 tensors, in torchvision's reference order."""
        steps = {"none": [], "ta_wide": [v2.TrivialAugmentWide()], "ra": [v2.RandAugment()],
                 "augmix": [v2.AugMix()]}[self.auto_augment]
        if self.random_erase > 0:
            steps.append(v2.RandomErasing(p=self.random_erase, value=list(self.erase_fill)))
        return v2.Compose(steps) if steps else None


def apply_policy(policy: v2.Transform, image: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
    """torchvision's policy with torch's generator seeded from the sample's key; the caller's generator state is kept
    (torchvision's transforms draw from the global one). Not thread-safe: loader workers are processes."""
    key = int(np.random.default_rng((seed, epoch, index, POLICY_STREAM)).integers(2 ** 63))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        return policy(image)


def drop_key(seed: int, epoch: int, index: int) -> int:
    """The sample's 32-bit key for its stochastic depth and dropout masks in the epoch: fgic.drop's integer mix of
    (seed, stream, epoch, index): 1.8 us a sample where numpy's seeded generator took 27 us (the cached loader makes
    one for every training image). Distinct indices of an epoch get distinct keys: each step of the mix is a
    bijection."""
    key = mix32((seed ^ DROP_STREAM) & M32)
    for part in (epoch, index):
        key = mix32(key ^ (part & M32))
    return key


def mix_params(seed: int, epoch: int, index: int, n: int, crop: int, extra: Extra) -> tuple[int, torch.Tensor]:
    """The sample's mixing partner, drawn from the whole training set (n samples), and its (cutmix, lam, y1, y2, x1,
    x2) row: lam ~ Beta(alpha, alpha) is the sample's weight, exact for a cutmix box (torchvision's CutMix box)."""
    rng = np.random.default_rng((seed, epoch, index, MIX_STREAM))
    partner = int(rng.integers(0, n))
    cut = extra.cutmix_alpha > 0 and (extra.mixup_alpha == 0 or rng.random() < MIX_SWITCH_PROB)
    lam = float(rng.beta(*(2 * [extra.cutmix_alpha if cut else extra.mixup_alpha])))
    box = (0, 0, 0, 0)
    if cut:
        cy, cx = (int(v) for v in rng.integers(0, crop, size=2))
        half = int(0.5 * math.sqrt(1.0 - lam) * crop)
        box = (max(cy - half, 0), min(cy + half, crop), max(cx - half, 0), min(cx + half, crop))
        lam = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / crop ** 2
    return partner, torch.tensor((float(cut), lam, *box), dtype=torch.float64)


def mix(images: torch.Tensor, labels: torch.Tensor, partners: torch.Tensor, partner_labels: torch.Tensor,
        rows: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images mixed with their normalised partners by their rows (mix_params), and the soft targets
    lam * one_hot(label) + (1 - lam) * one_hot(partner's)."""
    cut, lam = rows[:, 0].bool(), rows[:, 1]
    y1, y2, x1, x2 = rows[:, 2:].long().unbind(1)
    steps = torch.arange(images.shape[-1], device=images.device)
    inside = ((steps >= y1[:, None]) & (steps < y2[:, None]))[:, :, None] & \
        ((steps >= x1[:, None]) & (steps < x2[:, None]))[:, None, :]
    weight = torch.where(cut[:, None, None], (~inside).to(images.dtype), lam[:, None, None].to(images.dtype))
    weight = weight[:, None]
    mixed = images * weight + partners * (1 - weight)
    lam = lam.float()[:, None]
    targets = torch.nn.functional.one_hot(labels, num_classes).float() * lam + \
        torch.nn.functional.one_hot(partner_labels, num_classes).float() * (1 - lam)
    return mixed, targets


class Views:
    """A training set's items by key: the sample's view (crop and flip, then the policy), label and drop key and,
    when mixing, its partner's view, label and mixing row. `image(i)` is sample i resized (uint8 CHW), `label(i)` its
    class."""

    def __init__(self, seed: int, size: int, crop: int, padding: int, extra: Extra):
        self.seed, self.size, self.crop, self.padding, self.extra = seed, size, crop, padding, extra
        self.policy = extra.policy()

    def view(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        out = crop_flip(image, sample_params(self.seed, epoch, index, self.size, self.crop, self.padding), self.crop,
                        self.padding)
        return out if self.policy is None else apply_policy(self.policy, out, self.seed, epoch, index)

    def item(self, image, label, n: int, epoch: int, index: int) -> Batch:
        own = Batch(self.view(image(index), epoch, index), label(index), drop_key(self.seed, epoch, index))
        if not self.extra.mixing:
            return own
        partner, row = mix_params(self.seed, epoch, index, n, self.crop, self.extra)
        return own._replace(partners=self.view(image(partner), epoch, partner), partner_labels=label(partner),
                            mix_rows=row)
