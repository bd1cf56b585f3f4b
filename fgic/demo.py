"""Synthetic datasets in the ImageFolder layout, each deterministic: the small fine-grained "birds" behind
``-d demo`` (generated once), photo-sized JPEGs for fgic.bench, and the tests' tiny colour-cast sets."""
from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fgic.cli import run_cli
from fgic.errors import FgicError

VERSION = "fgic-demo 1"
MARKER = ".fgic-demo-complete"
SPLITS = {"train": 48, "test": 10}  # images per class
IMAGE_SIZE = 96
JPEG_QUALITY = 90
SEED = 20240601
_SS = 3  # supersampling factor for anti-aliased drawing

# A class is a wing-bar colour plus a set of head/bill/tail details; within one bar colour any two classes differ
# in at least two details. Body colour, background, pose and lighting are nuisance shared by all classes.
WINGBARS = {"red": (200, 30, 35), "yellow": (235, 205, 40), "white": (240, 240, 232)}
_CLASS_TRAITS = [("red", ()), ("red", ("crested", "eyering")), ("red", ("longbill", "bandedtail")),
                 ("red", ("crested", "longbill")), ("yellow", ("eyering", "bandedtail")),
                 ("yellow", ("crested", "bandedtail")), ("yellow", ("eyering", "longbill")),
                 ("white", ()), ("white", ("crested", "eyering")), ("white", ("longbill", "bandedtail"))]
DEMO_CLASSES = [f"{i:02d}_{bar}_wingbar_{'_'.join(traits) or 'plain'}" for i, (bar, traits) in enumerate(_CLASS_TRAITS)]
NUM_CLASSES = len(DEMO_CLASSES)

BODY_PALETTE = [(125, 92, 60), (112, 112, 106), (98, 108, 62), (72, 82, 104), (165, 134, 92), (64, 58, 52)]
BILL_PALETTE = [(40, 36, 32), (95, 90, 80), (150, 120, 70)]
BACKGROUND_PALETTE = [(110, 140, 80), (150, 170, 190), (140, 125, 100), (90, 110, 90), (180, 175, 160)]
CLUTTER_PALETTE = [(60, 110, 40), (90, 140, 60), (110, 80, 50), (200, 40, 40), (230, 200, 50), (235, 235, 225),
                   (70, 60, 45), (150, 160, 90)]
_FILE_RE = re.compile(r"\d{4}\.jpg")


class DemoError(FgicError):
    """The demo folder exists but holds something a demo generation did not write."""


def _ellipse(cx, cy, rx, ry, n=28):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _band(cx, cy, rx, ry, x0, x1, n=10):
    """The part of an ellipse between x0 and x1 (a bar across a wing or tail)."""
    x = np.linspace(x0, x1, n)
    h = ry * np.sqrt(np.clip(1 - ((x - cx) / rx) ** 2, 0, 1))
    return np.concatenate([np.stack([x, cy - h], 1), np.stack([x[::-1], (cy + h)[::-1]], 1)])


def _background(rng, size):
    """Smooth random colour field plus branches and leaves, some in the wing-bar colours."""
    base = np.array(BACKGROUND_PALETTE[rng.integers(len(BACKGROUND_PALETTE))])
    field = np.clip(base + rng.normal(0, 25, (4, 4, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 6))):
        colour = tuple(int(c) for c in CLUTTER_PALETTE[rng.integers(len(CLUTTER_PALETTE))])
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            a, length = rng.uniform(0, np.pi), rng.uniform(0.2, 0.6) * size
            draw.line([(x, y), (x + length * math.cos(a), y + length * math.sin(a))], fill=colour,
                      width=int(rng.integers(1, 4)) * _SS)
        else:
            r = rng.uniform(0.02, 0.06) * size
            draw.ellipse([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=colour)
    return img, draw


def _bird(draw, rng, bar, traits, size):
    """Draw one bird facing left or right; local units: body length about 1, origin at the body centre."""
    scale = rng.uniform(0.6, 0.7) * size
    angle = rng.uniform(-0.3, 0.3)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    centre = np.array([size / 2, size / 2]) + rng.uniform(-0.06, 0.06, 2) * size
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def poly(points, colour):
        pts = (np.asarray(points) * [mirror, 1.0]) @ rot.T * scale + centre
        draw.polygon([tuple(p) for p in pts], fill=tuple(int(c) for c in np.clip(colour, 0, 255)))

    body = np.array(BODY_PALETTE[rng.integers(len(BODY_PALETTE))]) + rng.integers(-15, 16, 3)
    belly, wing = body * 0.55 + 110, body * 0.7
    bill = BILL_PALETTE[rng.integers(len(BILL_PALETTE))]
    hx, hy, hr = 0.33, -0.17, 0.14  # head
    for dx in (-0.06, 0.06):  # legs
        poly([(dx - 0.012, 0.15), (dx + 0.012, 0.15), (dx + 0.012, 0.33), (dx - 0.012, 0.33)], bill)
    poly([(-0.3, -0.06), (-0.64, -0.15), (-0.66, 0.05), (-0.3, 0.06)], wing)  # tail
    if "bandedtail" in traits:
        for x in (-0.38, -0.5, -0.62):
            poly([(x, -0.1), (x - 0.06, -0.13), (x - 0.06, 0.06), (x, 0.06)], (235, 235, 225))
    poly(_ellipse(0, 0, 0.38, 0.21), body)
    poly(_ellipse(0.04, 0.07, 0.3, 0.13), belly)
    poly(_ellipse(-0.06, -0.03, 0.27, 0.12), wing)
    poly(_band(-0.06, -0.03, 0.27, 0.12, -0.05, 0.09), WINGBARS[bar])
    if "crested" in traits:
        poly([(hx - 0.12, hy - 0.06), (hx - 0.26, hy - 0.34), (hx - 0.04, hy - 0.13), (hx - 0.08, hy - 0.4),
              (hx + 0.05, hy - 0.12)], body * 0.6)
    poly(_ellipse(hx, hy, hr, hr), body)
    tip = 0.3 if "longbill" in traits else 0.08
    poly([(hx + 0.1, hy - 0.06), (hx + hr + tip, hy + 0.02), (hx + 0.1, hy + 0.07)], bill)
    if "eyering" in traits:
        poly(_ellipse(hx + 0.05, hy - 0.03, 0.085, 0.085), (245, 245, 240))
    poly(_ellipse(hx + 0.05, hy - 0.03, 0.028, 0.028), (10, 10, 10))


def render(split: str, class_index: int, index: int) -> Image.Image:
    """One IMAGE_SIZE x IMAGE_SIZE RGB image of class ``class_index``, fully determined by its arguments."""
    rng = np.random.default_rng([SEED, list(SPLITS).index(split), class_index, index])
    size = IMAGE_SIZE * _SS
    img, draw = _background(rng, size)
    _bird(draw, rng, *_CLASS_TRAITS[class_index], size)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    # lighting: global gain, a linear gradient in a random direction, sensor noise
    ramp = np.linspace(-1, 1, IMAGE_SIZE)
    a = rng.uniform(0, 2 * np.pi)
    grad = 1 + rng.uniform(0, 0.3) * (np.cos(a) * ramp[None, :] + np.sin(a) * ramp[:, None])
    pix = np.asarray(img, np.float32) * (rng.uniform(0.75, 1.2) * grad)[..., None]
    pix += rng.normal(0, 4, pix.shape)
    return Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8))


def generate(out: str | os.PathLike) -> None:
    """Write every image of the dataset into ``out`` (ImageFolder layout); no marker."""
    out = Path(out)
    for split, count in SPLITS.items():
        for c, name in enumerate(DEMO_CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                render(split, c, i).save(folder / f"{i:04d}.jpg", quality=JPEG_QUALITY)


def _photo(task) -> None:
    """One 500x375 JPEG: a smooth colour field, a class-coloured blob ("the bird"), sensor noise."""
    path, seed, label = task
    rng = np.random.default_rng(seed)
    h, w = 375, 500
    coarse = rng.uniform(30, 220, (6, 8, 3)).astype(np.uint8)  # smooth photo-like colour field
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    y, x = np.mgrid[:h, :w]
    cy, cx = rng.uniform(100, 275), rng.uniform(120, 380)
    blob = ((y - cy) / rng.uniform(40, 120)) ** 2 + ((x - cx) / rng.uniform(50, 150)) ** 2 < 1
    field[blob] = field[blob] * 0.4 + np.array([(label * 37) % 255, (label * 91) % 255, (label * 53) % 255]) * 0.6
    field += rng.normal(0, 6, field.shape)  # texture: JPEGs of realistic size
    Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_photos(folder: Path, images: int, classes: int = 10, workers: int = 1) -> int:
    """`images` training and images/8 test JPEGs of 500x375 (CUB's typical size), for throughput measurements;
    returns how many were written."""
    tasks = []
    for split, count in (("train", images), ("test", max(classes, images // 8))):
        for i in range(count):
            out = Path(folder) / split / f"class_{i % classes:02d}"
            out.mkdir(parents=True, exist_ok=True)
            tasks.append((str(out / f"{i:05d}.jpg"), len(tasks), i % classes))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_photo, tasks, chunksize=32))
    return len(tasks)


def make_tiny(root: Path, train_counts=(8, 8, 8), test_counts=(34, 34, 33), size=40, seed=0) -> Path:
    """Random JPEGs whose classes differ by a colour cast (learnable in a few steps), for the tests."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", train_counts), ("test", test_counts)):
        for c, n in enumerate(counts):
            folder = Path(root) / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (rng.random((size, size, 3)) * 90).astype(np.uint8)
                pixels[..., c % 3] += 150
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return Path(root)


def is_complete(root: str | os.PathLike) -> bool:
    marker = Path(root) / MARKER
    return marker.is_file() and marker.read_text().strip() == VERSION


def _only_demo_files(root: Path) -> bool:
    """True if ``root`` holds nothing but what some demo generation writes (so it is safe to delete)."""
    ours = (root / MARKER).is_file()  # an older version's dataset: accept its class names
    for split in root.iterdir():
        if split.name == MARKER and split.is_file():
            continue
        if split.name not in SPLITS or not split.is_dir():
            return False
        for cls in split.iterdir():
            if not cls.is_dir() or not (cls.name in DEMO_CLASSES or ours and re.fullmatch(r"\d\d_\w+", cls.name)):
                return False
            if any(not (f.is_file() and _FILE_RE.fullmatch(f.name)) for f in cls.iterdir()):
                return False
    return True


def ensure_demo(root: str | os.PathLike) -> Path:
    """Return ``root`` holding the complete demo dataset, generating it first if needed (safe to race)."""
    root = Path(root)
    if is_complete(root):
        return root
    if root.exists() and not (root.is_dir() and _only_demo_files(root)):
        raise DemoError(f"{root} exists but is not a demo dataset; move it away or choose another --data-root")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        generate(tmp)
        (tmp / MARKER).write_text(VERSION + "\n")
        if root.exists() and not is_complete(root):  # stale partial dataset: move aside, then delete
            try:
                os.rename(root, tmp.with_name(tmp.name + ".old"))
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(tmp.with_name(tmp.name + ".old"), ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not is_complete(root):  # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m fgic.demo [ROOT]  (generate the demo dataset in ROOT, default ./data/demo)"
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) > 1 or argv and argv[0].startswith("-"):
        raise FgicError(usage)
    root = ensure_demo(argv[0] if argv else "data/demo")
    counts = ", ".join(f"{n * NUM_CLASSES} {split}" for split, n in SPLITS.items())
    print(f"demo: {NUM_CLASSES} classes, {counts} images ({IMAGE_SIZE}x{IMAGE_SIZE} JPEG) in {root}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="fgic.demo")
