"""Image files, without torch (fgic.prepare and fgic.report stay light): which files are images, how one decodes to
RGB, and the check before training that finds every unreadable or truncated image of a split at once.

The check: `fast` (the default) reads each file's header and, for JPEG and PNG, its end marker, which catches files
cut short by an interrupted copy, in about a tenth of a millisecond per file. `full` decodes every image. `off` skips
both.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

# torchvision.datasets.folder.IMG_EXTENSIONS, which ImageFolder lists a split by (a test keeps the two equal)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MODES = ("fast", "full", "off")
_TAIL = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xae\x42\x60\x82",)}


def is_image(name: str) -> bool:
    """A file name the dataset reads as an image (hidden files, such as macOS's `._` copies, are not)."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def split_classes(split) -> list[str]:
    """The class folders of a split (train/ or test/), sorted: its folders but hidden ones (`.ipynb_checkpoints`),
    the one listing of classes (the layout check, the datasets and so the cache, the run's class names, fgic.prepare's
    collated mirrors)."""
    return sorted(e.name for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))


def load_rgb(path: str) -> Image.Image:
    """Open an image as 8-bit RGB, honouring its EXIF orientation (grayscale, palette, CMYK, RGBA and 16-bit
    images included)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits, not a clipped copy
            img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
        return img.convert("RGB")


def problem(path: str, mode: str) -> str | None:
    """Why `path` cannot be trained on, or None when it looks fine."""
    try:
        with Image.open(path) as img:
            fmt = img.format
            if mode == "full":
                img.load()
                return None
    except Exception as exc:  # PIL raises many types for broken files
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
    tails = _TAIL.get(fmt)
    if tails:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64))
            end = f.read().rstrip(b"\x00\r\n ")
        # A tail without the end marker is mostly a file cut short, but phones append data after it (Samsung's
        # trailer, a motion photo's MP4): such a file is decoded whole to tell
        if not end.endswith(tails) and problem(path, "full") is not None:
            return f"truncated {fmt} (no end marker)"
    return None


def scan(paths: list[str], mode: str, workers: int = 8) -> dict[str, str]:
    """{path: problem} for the bad files among `paths`."""
    if mode == "off" or not paths:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = pool.map(lambda p: problem(p, mode), paths, chunksize=64)
        return {p: why for p, why in zip(paths, found) if why}
