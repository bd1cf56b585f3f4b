"""The data path: resolve -d to a folder, check its layout, and build the keyed datasets and loaders."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from fgic import augment, cache, images, samplers, signals
from fgic.batch import collate
from fgic.cacheload import CachedBatches, CachedImageFolder
from fgic.config import REGISTRY, dataset_name
from fgic.demo import ensure_demo
from fgic.errors import FgicError
from fgic.keyed import KeyedImages
from fgic.samplers import ShardSampler, TrainSampler

SPLITS = ("train", "test")
# Where `python -m fgic.prepare NAME SRC` finds each registry dataset's official release (the hint in errors).
RELEASES = {"cub": "/path/to/CUB_200_2011", "aircraft": "/path/to/fgvc-aircraft-2013b",
            "cars": "/path/to/stanford_cars", "nabirds": "/path/to/nabirds", "dogs": "/path/to/stanford_dogs",
            "flowers": "/path/to/flowers102", "pets": "/path/to/oxford-iiit-pet"}


def resolve(data: str, data_root: str) -> tuple[str, Path]:
    """-d NAME|PATH -> (dataset name for the run folder, dataset folder). `demo` is generated on first use."""
    if data in REGISTRY:
        root = Path(data_root) / data
        if data == "demo":
            return data, Path(ensure_demo(root))
        if not root.is_dir():
            raise FgicError(f"-d {data}: no dataset at {root}; prepare it with `python -m fgic.prepare {data} "
                            f"{RELEASES[data]}` (see README 'Data'), or point --data-root / $FGIC_DATA at the "
                            f"folder holding {data}/")
        return data, root
    root = Path(data)
    if not root.is_dir():
        raise FgicError(f"-d {data}: no such folder; give one of {', '.join(REGISTRY)} or a folder holding train/ "
                        f"and test/")
    return dataset_name(data), root


def class_samples(split: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of each image file (images.is_image) under each class folder, in ImageFolder's order; hidden
    folders inside a class folder are skipped as well."""
    found = []
    for name, label in sorted(class_to_idx.items()):
        walk = []
        for folder, dirs, files in os.walk(split / name, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            walk.append((folder, files))
        found += [(os.path.join(folder, f), label) for folder, files in sorted(walk) for f in sorted(files)
                  if images.is_image(f)]
    return found


def check_layout(root: Path) -> list[str]:
    """The class names, after checking train/ and test/ exist, have class folders with images, and agree."""
    classes = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise FgicError(f"{folder}: missing; a dataset folder holds train/ and test/, each with one folder per "
                            f"class")
        names = images.split_classes(folder)
        if not names:
            raise FgicError(f"{folder}: no class folders; put each class's images in {folder}/CLASS_NAME/")
        for name in names:
            if not any(images.is_image(f) for f in os.listdir(folder / name)):
                raise FgicError(f"{folder / name}: no images ({', '.join(images.IMG_EXTENSIONS)}); add some or remove "
                                f"the folder")
        classes[split] = names
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise FgicError(f"{root}: train/ and test/ have different classes (only in train: {only_train[:3]}, "
                        f"only in test: {only_test[:3]}); both need the same class folders")
    return classes["train"]


class KeyedImageFolder(KeyedImages, ImageFolder):
    """KeyedImages decoded from the split's image files. Its classes and samples are images.split_classes' and
    class_samples' (ImageFolder's own count hidden folders as classes and `._x.jpg` as images)."""

    def __init__(self, root: Path, train: bool, resize: int, crop: int, padding: int, seed: int,
                 extra: augment.Extra = augment.Extra(), normalization: augment.Normalization = augment.IMAGENET):
        super().__init__(str(root), loader=images.load_rgb)
        self.train, self.size, self.crop, self.padding, self.seed = train, resize, crop, padding, seed
        self.normalization = normalization
        self.views = augment.Views(seed, resize, crop, padding, extra)

    def find_classes(self, directory) -> tuple[list[str], dict[str, int]]:
        names = images.split_classes(Path(directory))
        return names, {name: i for i, name in enumerate(names)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return class_samples(Path(directory), class_to_idx)

    def image(self, index: int) -> torch.Tensor:
        return augment.resize(self.loader(self.samples[index][0]), self.size)


class Loader(DataLoader):
    """A DataLoader whose worker processes leave the stop signals to the training process (signals.ignore_stop):
    they start with the signals blocked (fork and spawn pass the mask on, as does a forkserver started here) and
    ignore them from their first step on."""

    def __init__(self, dataset, **opts):
        super().__init__(dataset, worker_init_fn=signals.ignore_stop, **opts)

    def __iter__(self):
        if self.num_workers:  # under spawn and forkserver, a lock starts multiprocessing's resource tracker, whose
            # start ends with SIGTERM unblocked (SIG_UNBLOCK, not a restore): here, not inside the block below
            (self.multiprocessing_context or multiprocessing.get_context()).Lock()
        with signals.blocked():  # the workers start here (once, with persistent_workers)
            return super().__iter__()


def drop_bad_images(ds: ImageFolder, mode: str, skip: bool, workers: int) -> None:
    """Scan a split; bad files are an error naming them, or (with --skip-bad-images) left out with a count."""
    bad = images.scan([p for p, _ in ds.samples], mode, workers=max(workers, 2))
    if not bad:
        return
    if not skip:
        for path, why in sorted(bad.items()):
            print(f"fgic: bad image {path}: {why}", file=sys.stderr)
        first = sorted(bad)[0]
        raise FgicError(f"{ds.root}: {len(bad)} unreadable or truncated image(s) (first: {first}: {bad[first]}); "
                        f"replace or remove them, or pass --skip-bad-images to train without them")
    ds.samples = [s for s in ds.samples if s[0] not in bad]
    ds.imgs, ds.targets = ds.samples, [t for _, t in ds.samples]
    print(f"fgic: notice: left out {len(bad)} bad image(s) of {ds.root} (--skip-bad-images)", file=sys.stderr)


def usable_cpus() -> int:
    """The CPUs this process may use (its affinity mask, e.g. Slurm's allocation), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(local_world_size: int, kind: str = "single", env=os.environ) -> int:
    """Loader workers per process: the CPUs this process may count on, at most 8. An srun task counts its own
    --cpus-per-task (its affinity mask shows the whole node where Slurm does not bind tasks to CPUs); other
    processes share the CPUs they may use with the node's other processes (torchrun's workers, their launcher's)."""
    if kind == "srun" and env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return min(8, usable_cpus(), int(env["SLURM_CPUS_PER_TASK"]))
    return min(8, usable_cpus() // max(1, local_world_size))


@dataclass(frozen=True)
class DataSpec:
    """What the data path takes of a run, by keyword (fgic.ddp builds it from its resolved flags, fgic.bench from
    the recipe): sizes and seed of the augmentation, the global batch, loader workers, the image check, the cache."""
    resize: int
    crop: int
    padding: int
    seed: int
    batch_size: int  # global
    workers: int
    check_images: str = "fast"
    skip_bad_images: bool = False
    cache: str = "auto"
    cache_dir: str | None = None
    auto_augment: str = "none"
    random_erase: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mean: tuple[float, ...] = augment.IMAGENET.mean
    std: tuple[float, ...] = augment.IMAGENET.std
    sample_order: str = samplers.ORDER  # not a flag: a resumed run's is its checkpoint's (samplers.order_of)

    @property
    def normalization(self) -> augment.Normalization:
        return augment.Normalization(tuple(self.mean), tuple(self.std))

    @property
    def extra(self) -> augment.Extra:
        return augment.Extra(self.auto_augment, self.random_erase, self.mixup_alpha, self.cutmix_alpha,
                             self.normalization.fill)

    @classmethod
    def of(cls, args, sample_order: str = samplers.ORDER) -> DataSpec:
        """The spec of fgic.ddp's resolved flags."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name != "sample_order"},
                   sample_order=sample_order)


def build(spec: DataSpec, root: Path, world_size: int, rank: int, pin_memory: bool):
    """(train_set, test_set, train_loader, test_loader) for this process; the loaders' batch is the per-process one.
    With the cache on (--cache), the datasets read the node's decoded-image cache, built first if needed."""
    train_set = KeyedImageFolder(root / "train", True, spec.resize, spec.crop, spec.padding, spec.seed, spec.extra,
                                 spec.normalization)
    test_set = KeyedImageFolder(root / "test", False, spec.resize, spec.crop, spec.padding, spec.seed,
                                normalization=spec.normalization)
    for split in (train_set, test_set):
        drop_bad_images(split, spec.check_images, spec.skip_bad_images, spec.workers)
    if len(train_set) < spec.batch_size:
        raise FgicError(f"-b/--batch-size {spec.batch_size} is larger than the {len(train_set)} training images "
                        f"in {root / 'train'}; use a smaller batch")
    train_set, test_set = use_cache(spec, root, (train_set, test_set), say=rank == 0)
    per_process = spec.batch_size // world_size
    opts = dict(num_workers=spec.workers, pin_memory=pin_memory, persistent_workers=spec.workers > 0,
                collate_fn=collate)  # Batch items -> a Batch
    sampler = TrainSampler(len(train_set), world_size, rank, spec.seed, spec.sample_order)
    if isinstance(train_set, CachedImageFolder) and train_set.device_crops:  # whole batches from the map by threads
        train_loader = CachedBatches(train_set, sampler, per_process, threads=max(spec.workers, 1), pin=pin_memory)
    else:
        train_loader = Loader(train_set, batch_size=per_process, drop_last=True, sampler=sampler, **opts)
    test_sampler = ShardSampler(len(test_set), world_size, rank)
    test_loader = Loader(test_set, batch_size=per_process, sampler=test_sampler, **opts)
    return train_set, test_set, train_loader, test_loader


def fingerprint(root: Path, splits) -> str:
    """The splits' files as the processes must agree on them: their paths relative to -d's folder (node-local copies
    compare equal), sizes and labels."""
    h = hashlib.sha256()
    for split in splits:
        for path, label in split.samples:
            h.update(f"{os.path.relpath(path, root)}\0{os.stat(path).st_size}\0{label}\n".encode())
        h.update(b"\n")
    return h.hexdigest()


def use_cache(spec: DataSpec, root: Path, splits: tuple, say: bool = True) -> tuple:
    """The splits served from the cache when --cache decides so (one line on stderr says why), else unchanged."""
    folder = cache.folder(spec.cache_dir)
    need = sum(cache.nbytes(len(s), spec.resize) for s in splits)
    on, why = cache.decide(spec.cache, need, folder)
    if say:
        print(f"fgic: {why}", file=sys.stderr, flush=True)
    if not on:
        return splits
    return tuple(CachedImageFolder(s, cache.ensure(folder, root, name, s.samples, spec.resize, workers=usable_cpus()))
                 for s, name in zip(splits, SPLITS))


def check_batch(batch_size: int, world_size: int) -> int:
    """The per-process batch; the global batch must split evenly so every layout trains on the same batches."""
    if batch_size < world_size or batch_size % world_size:
        raise FgicError(f"-b/--batch-size {batch_size} does not split evenly over {world_size} processes; "
                        f"use a multiple of {world_size}")
    return batch_size // world_size
