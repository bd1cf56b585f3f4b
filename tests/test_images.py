"""Unusual but valid images load as RGB; broken ones are all found by the scan before training."""
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from fgic import images
from fgic.demo import make_tiny
from tests.helpers import REPO, fgic_env, run_fgic, tiny_args


def rgb_array(h=30, w=40):
    return (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)


def write_unusual(folder):
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(rgb_array())
    base.convert("L").save(folder / "gray.jpg")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    base.convert("P").save(folder / "palette.png")
    base.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray((np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)).save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    base.save(folder / "rotated.jpg", exif=exif)
    return sorted(folder.iterdir())


def test_unusual_images_load_as_rgb(tmp_path):
    for path in write_unusual(tmp_path):
        img = images.load_rgb(str(path))
        assert img.mode == "RGB", path.name
        assert img.size == ((30, 40) if path.name == "rotated.jpg" else (40, 30)), path.name
        assert images.problem(str(path), "full") is None and images.problem(str(path), "fast") is None
    deep = np.asarray(images.load_rgb(str(tmp_path / "deep.png")))
    assert deep.max() > 200 and deep.min() < 10  # scaled to 8 bits, not clipped to white


def write_broken(folder):
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.fromarray(rgb_array()).save(good, format="JPEG")
    (folder / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "text.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    return ["cut.jpg", "empty.png", "text.jpg"]


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_scan_finds_every_broken_file(tmp_path, mode):
    names = write_broken(tmp_path)
    write_unusual(tmp_path / "ok")
    paths = [str(p) for p in sorted(tmp_path.rglob("*")) if p.is_file()]
    bad = images.scan(paths, mode)
    assert sorted(p.rsplit("/", 1)[1] for p in bad) == names
    assert images.scan(paths, "off") == {}


@pytest.mark.parametrize("fmt, trailer", [("JPEG", b"SEFT" * 4), ("JPEG", b"\0\0\0\x18ftypmp42" + bytes(4096)),
                                          ("PNG", b"extra bytes")])
def test_a_whole_image_with_data_after_its_end_marker_is_good(tmp_path, fmt, trailer):
    """Phones append data after the end marker (Samsung's trailer, a motion photo's MP4): not a cut file."""
    data = io.BytesIO()
    Image.fromarray(rgb_array()).save(data, format=fmt)
    path = tmp_path / f"phone.{fmt.lower()}"
    path.write_bytes(data.getvalue() + trailer)
    assert images.problem(str(path), "fast") is None and images.problem(str(path), "full") is None
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data.getvalue()[: len(data.getvalue()) * 2 // 3])
    assert images.problem(str(cut), "fast") == f"truncated {fmt} (no end marker)"


@pytest.mark.e2e
def test_training_stops_on_bad_images_or_skips_them(tmp_path):
    root = make_tiny(tmp_path / "d", (6, 6), (3, 3))
    write_broken(root / "train" / "class_00")
    args = ["-d", str(root), *tiny_args(epochs=1, batch_size=6), "--output-dir", str(tmp_path / "runs")]
    res = run_fgic(args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "3 unreadable or truncated image(s)" in res.stderr.splitlines()[-1]
    assert "--skip-bad-images" in res.stderr.splitlines()[-1]
    assert sum("fgic: bad image" in line for line in res.stderr.splitlines()) == 3
    res = run_fgic(args + ["--skip-bad-images"])
    assert res.returncode == 0, res.stderr
    assert "left out 3 bad image(s)" in res.stderr


def test_image_files_are_those_imagefolder_lists():
    assert images.IMG_EXTENSIONS == IMG_EXTENSIONS
    assert images.is_image("a.JPG") and images.is_image("b.webp")
    assert not images.is_image("._a.jpg") and not images.is_image("Thumbs.db") and not images.is_image("README")


@pytest.mark.e2e
def test_the_light_commands_do_not_import_torch():
    code = "import sys, fgic.images, fgic.prepare, fgic.report; sys.exit('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=fgic_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr or "torch was imported"
