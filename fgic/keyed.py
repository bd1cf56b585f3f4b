"""A split's items by key, the base of fgic.data's decoded datasets and fgic.cacheload's cached ones: they differ in
`image()` alone."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from fgic import augment
from fgic.batch import Batch


class KeyedImages(Dataset):
    """Batch items of uint8 CHW crops. Training items are fetched by (epoch, index) keys and augmented from
    (seed, epoch, index) (augment.Views); test items by index, resized and centre-cropped. A subclass gives
    `image(index)`, the sample resized (uint8 CHW), and sets the attributes below."""
    root: str
    samples: list[tuple[str, int]]  # (path, label)
    classes: list[str]
    train: bool
    size: int  # resize
    crop: int
    padding: int
    seed: int
    views: augment.Views
    normalization: augment.Normalization  # the model's inputs' (fgic.engine.inputs applies it where the batch trains)

    def image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> Batch:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        if self.train:
            return self.views.item(self.image, self.label, len(self.samples), epoch, index)
        return Batch(augment.center_crop(self.image(index), self.crop), self.label(index))

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        """A loader batch on `device`; one with crop parameters (CachedBatches') is cropped and flipped there."""
        moved = batch.to(device, non_blocking=True)
        if moved.params is None:
            return moved
        crops = augment.crop_flip_batch(moved.images, moved.params, self.crop, self.padding)
        return moved._replace(images=crops, params=None)
