"""A batch by name: what every loader path yields, each field a path has not being None."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import default_collate


class Batch(NamedTuple):
    """Images and labels and, where the path has them, the samples' drop keys, their mixing partners and the crop
    parameters still to apply. A dataset item is the Batch of one sample (a CHW image, its label and drop key as
    ints); engine.inputs gives the Batch that trains (normalised float images; mixed, class probabilities as labels)."""
    images: torch.Tensor  # uint8 (N)CHW crops; with `params`, the resized images still to crop
    labels: torch.Tensor | int  # class indices, or (mixed, after engine.inputs) class probabilities
    keys: torch.Tensor | int | None = None  # training: each sample's drop key (augment.drop_key)
    partners: torch.Tensor | None = None  # mixing: each sample's partner's crop (augment.mix_params)
    partner_labels: torch.Tensor | int | None = None
    mix_rows: torch.Tensor | None = None  # mixing: (cutmix, lam, y1, y2, x1, x2) of each sample
    params: torch.Tensor | None = None  # CachedBatches': (top, left, flip) of each image, cropped where it trains

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=non_blocking) for t in self))


def collate(items: list[Batch]) -> Batch:
    """The loaders' collate_fn: torch's default collation of each field the items have (it stops at None)."""
    return Batch(*(None if field[0] is None else default_collate(list(field)) for field in zip(*items)))
