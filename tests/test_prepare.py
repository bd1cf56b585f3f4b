"""fgic.prepare on miniature releases written here in the official formats (CUB list files, FGVC-Aircraft list files,
Stanford Cars CSV / devkit .mat / class folders), pitfalls included."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from fgic import data, images, prepare
from fgic.cli import run_cli
from fgic.errors import FgicError
from fgic.prepare import Expected
from tests.helpers import fgic_env, interrupt_prepare_after


def write_image(path: Path, seed: int, mode: str = "RGB") -> Path:
    """A tiny JPEG whose bytes differ for each seed (so a placed file can be traced back to its source)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, quality=90)
    return path


def snapshot(root: Path) -> dict:
    """Every path under root with its content hash and mtime: equal snapshots mean root was not modified."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            st = p.lstat()
            digest = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p.relative_to(root))] = (digest, st.st_mtime_ns, st.st_mode)
    return out


def placed(dst: Path) -> dict[str, dict[str, set[str]]]:
    """{split: {class folder: {file names}}} of a prepared folder."""
    return {s: {c.name: {f.name for f in c.iterdir()} for c in (dst / s).iterdir()} for s in ("train", "test")}


def same_file(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


# --- CUB_200_2011 -------------------------------------------------------------------------------------------------

# classes.txt lists ids out of order on purpose: the class order must come from the ids.
CUB_CLASSES = {2: "002.Laysan_Albatross", 1: "001.Zebra_Finch", 3: "003.Mallard"}


def make_cub(root: Path, per_class=(2, 1)) -> Path:
    """CUB_200_2011/ with its four list files and images/CLASS/NAME.jpg; image 1 is grayscale, as a few CUB images
    are."""
    cub = root / "CUB_200_2011"
    (cub / "images").mkdir(parents=True)
    (cub / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in CUB_CLASSES.items()))
    images, labels, split = [], [], []
    k = 0
    for cid, name in sorted(CUB_CLASSES.items()):
        for j in range(sum(per_class)):
            k += 1
            rel = f"{name}/{name.split('.')[1]}_{k:04d}_{100 + k}.jpg"
            write_image(cub / "images" / rel, k, "L" if k == 1 else "RGB")
            images.append(f"{k} {rel}\n")
            labels.append(f"{k} {cid}\n")
            split.append(f"{k} {1 if j < per_class[0] else 0}\n")
    (cub / "images.txt").write_text("".join(images))
    (cub / "image_class_labels.txt").write_text("".join(labels))
    (cub / "train_test_split.txt").write_text("".join(split))
    (cub / "README").write_text("not an image list")
    return cub


CUB_SIZES = Expected(3, 6, 3)


def test_cub_release_is_linked_in_class_id_order_and_src_is_untouched(tmp_path):
    cub = make_cub(tmp_path / "src")
    before = snapshot(cub)
    dst = tmp_path / "data" / "cub"
    summary = prepare.prepare("cub", cub, dst, expected=CUB_SIZES)
    assert snapshot(cub) == before
    assert summary["train"] == 6 and summary["test"] == 3 and summary["classes"] == 3
    layout = placed(dst)
    assert sorted(layout["train"]) == ["001.Zebra_Finch", "002.Laysan_Albatross", "003.Mallard"]
    assert layout["test"]["001.Zebra_Finch"] == {"Zebra_Finch_0003_103.jpg"}
    gray = dst / "train" / "001.Zebra_Finch" / "Zebra_Finch_0001_101.jpg"
    src_gray = cub / "images" / "001.Zebra_Finch" / "Zebra_Finch_0001_101.jpg"
    assert os.path.samefile(gray, src_gray)  # a hard link: same file, no re-encoding
    with Image.open(gray) as img:
        assert img.mode == "L"
    assert images.load_rgb(str(gray)).mode == "RGB"  # the loader converts it
    # class i is the same class in train and test, and is the official id i + 1
    assert data.check_layout(dst) == sorted(layout["train"])
    train = ImageFolder(str(dst / "train"))
    test = ImageFolder(str(dst / "test"))
    want = {"001.Zebra_Finch": 0, "002.Laysan_Albatross": 1, "003.Mallard": 2}
    assert train.class_to_idx == test.class_to_idx == want


def test_rerun_is_a_no_op(tmp_path, capsys):
    cub = make_cub(tmp_path / "src")
    dst = tmp_path / "cub"
    dst.mkdir()  # an empty folder is no prepare, but may be replaced by one
    prepare.prepare("cub", cub, dst, expected=CUB_SIZES)
    first = snapshot(dst)
    capsys.readouterr()
    prepare.prepare("cub", cub, dst, expected=CUB_SIZES)
    assert "already prepared" in capsys.readouterr().out
    assert snapshot(dst) == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_interrupted_prepare_is_not_taken_for_a_finished_one(tmp_path, monkeypatch, capsys):
    cub = make_cub(tmp_path / "src")
    dst = tmp_path / "data" / "cub"
    interrupt_prepare_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare("cub", cub, dst, expected=CUB_SIZES)
    assert not dst.exists() and list(dst.parent.iterdir()) == []  # nothing at DST, the partial folder removed
    with pytest.raises(FgicError, match="-d cub: no dataset at"):
        data.resolve("cub", str(dst.parent))
    monkeypatch.undo()
    # a prepare killed outright (kill -9) leaves its temporary sibling; the next run ignores it and names it
    leftover = dst.parent / ".cub.prepare-dead"
    (leftover / "train" / "001.Zebra_Finch").mkdir(parents=True)
    prepare.prepare("cub", cub, dst, expected=CUB_SIZES)
    assert ".cub.prepare-dead is left from an interrupted prepare" in capsys.readouterr().err
    assert sum(len(v) for v in placed(dst)["train"].values()) == 6
    # a folder at DST that no prepare finished (e.g. a half-done manual copy) is refused, not trusted
    other = tmp_path / "other"
    (other / "train" / "001.Zebra_Finch").mkdir(parents=True)
    with pytest.raises(FgicError, match=r"other: exists but is not a finished fgic.prepare output"):
        prepare.prepare("cub", cub, other, expected=CUB_SIZES)


def test_cub_archive_is_extracted_beside_dst_and_files_moved(tmp_path):
    make_cub(tmp_path / "src")
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(tmp_path / "src" / "CUB_200_2011", arcname="CUB_200_2011")
    digest = hashlib.sha1(archive.read_bytes()).hexdigest()
    dst = tmp_path / "data" / "cub"
    summary = prepare.prepare("cub", archive, dst, expected=CUB_SIZES)
    assert summary["origin"] == f"CUB-200-2011 list files in {archive}/CUB_200_2011"
    assert hashlib.sha1(archive.read_bytes()).hexdigest() == digest
    assert [p.name for p in dst.parent.iterdir()] == ["cub"]  # the extraction folder is gone
    assert placed(dst) == placed(prepare_plain(tmp_path))
    assert not any(p.is_symlink() for p in dst.rglob("*"))  # files, not links into the deleted extraction


def prepare_plain(tmp_path):
    dst = tmp_path / "plain"
    prepare.prepare("cub", tmp_path / "src" / "CUB_200_2011", dst, copy=True, expected=CUB_SIZES)
    for f in (dst / "train" / "003.Mallard").iterdir():
        assert f.stat().st_nlink == 1  # --copy: independent files
    return dst


def test_symlinks_then_copies_where_hard_links_fail(tmp_path, monkeypatch, capsys):
    cub = make_cub(tmp_path / "src")

    def no_link(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    prepare.prepare("cub", cub, tmp_path / "sym", expected=CUB_SIZES)
    out = capsys.readouterr().out
    assert "9 symlinks in" in out and "keep SRC where it is" in out
    mallard = tmp_path / "sym" / "test" / "003.Mallard" / "Mallard_0009_109.jpg"
    assert mallard.is_symlink() and os.path.samefile(mallard, cub / "images" / "003.Mallard" / mallard.name)
    monkeypatch.setattr(os, "symlink", no_link)
    prepare.prepare("cub", cub, tmp_path / "copied", expected=CUB_SIZES)
    assert "9 copies in" in capsys.readouterr().out
    assert placed(tmp_path / "copied") == placed(tmp_path / "sym")


def in_cli(args, capsys):
    """fgic.prepare's command line in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: prepare.main(args), "fgic.prepare")
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_count_mismatch_is_an_error_unless_allow_partial(tmp_path, capsys, monkeypatch):
    cub = make_cub(tmp_path / "src")
    monkeypatch.delenv("FGIC_DATA", raising=False)
    root = tmp_path / "data"
    code, _, err = in_cli(["cub", str(cub), "--data-root", str(root)], capsys)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert "classes 3 (expected 200); train 6 (expected 5,994); test 3 (expected 5,794)" in err
    assert "--allow-partial" in err and not root.exists()
    code, out, err = in_cli(["cub", str(cub), "--data-root", str(root), "--allow-partial"], capsys)
    assert code == 0 and "warning: train 6 (expected 5,994)" in err
    assert f"python -m fgic.ddp -d cub --data-root {root}" in out
    assert data.resolve("cub", str(root)) == ("cub", root / "cub")
    assert len(data.check_layout(root / "cub")) == 3


@pytest.mark.parametrize("damage,flags,message", [
    ("no_split_file", [], r"train_test_split.txt: missing"),
    ("absent_image", [], r"1 listed train image\(s\) are missing \(first: .*Mallard_0007_107.jpg\)"),
    ("bad_line", [], r"image_class_labels.txt line 2: expected 'IMAGE_ID CLASS_ID'"),
    ("unknown_class", [], r"image 3 has class 9, which classes.txt does not list"),
    ("wrong_src", [], r"no cub release found; give the extracted CUB_200_2011 folder"),
    ("cub_only_flag", ["--aircraft-level", "family"], r"--aircraft-split/--aircraft-level apply to aircraft only"),
    ("dst_in_src", [], r"DST and SRC overlap; give a DST outside SRC"),
    ("not_an_archive", [], r"not a folder, tar or zip archive"),
    ("torn_archive", [], r"CUB_200_2011.tgz: could not be extracted"),
    ("archive_without_lists", [], r"CUB_200_2011.tgz/CUB_200_2011/image_class_labels.txt: missing"),
])
def test_bad_cub_input_is_one_line(tmp_path, capsys, damage, flags, message):
    cub = make_cub(tmp_path / "src")
    dst = tmp_path / "dst"
    if damage == "no_split_file":
        (cub / "train_test_split.txt").unlink()
    elif damage == "absent_image":
        next((cub / "images" / "003.Mallard").glob("*0007*")).unlink()
    elif damage == "bad_line":
        (cub / "image_class_labels.txt").write_text("1 1\n2\n")
    elif damage == "unknown_class":
        (cub / "image_class_labels.txt").write_text("".join(f"{k} {9 if k == 3 else 1}\n" for k in range(1, 10)))
    elif damage == "wrong_src":
        cub = tmp_path / "empty"
        cub.mkdir()
    elif damage == "dst_in_src":
        dst = cub / "prepared"
    elif damage == "not_an_archive":
        cub = cub / "images.txt"
    elif damage == "torn_archive":
        with tarfile.open(tmp_path / "whole.tgz", "w:gz") as t:
            t.add(cub, arcname="CUB_200_2011")
        cub = tmp_path / "CUB_200_2011.tgz"
        cub.write_bytes((tmp_path / "whole.tgz").read_bytes()[:2000])
    elif damage == "archive_without_lists":
        (cub / "image_class_labels.txt").unlink()
        with tarfile.open(tmp_path / "CUB_200_2011.tgz", "w:gz") as t:
            t.add(cub, arcname="CUB_200_2011")
        cub = tmp_path / "CUB_200_2011.tgz"
    code, _, err = in_cli(["cub", str(cub), str(dst), *flags], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not dst.exists() and not [p for p in dst.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("as_archive", [False, True])
def test_absent_images_are_left_out_with_allow_partial(tmp_path, capsys, as_archive):
    cub = make_cub(tmp_path / "src")
    next((cub / "images" / "003.Mallard").glob("*0007*")).unlink()
    if as_archive:  # the warning names the archive, not the temporary folder it is extracted to
        with tarfile.open(tmp_path / "CUB_200_2011.tgz", "w:gz") as t:
            t.add(cub, arcname="CUB_200_2011")
        cub = tmp_path / "CUB_200_2011.tgz"
    code, _, err = in_cli(["cub", str(cub), str(tmp_path / "dst"), "--allow-partial"], capsys)
    assert code == 0 and f"1 listed train image(s) are missing (first: {cub}/" in err, err
    assert placed(tmp_path / "dst")["train"]["003.Mallard"] == {"Mallard_0008_108.jpg"}
    partial = json.loads((tmp_path / "dst" / prepare.MARKER).read_text())["partial"]
    assert partial[0].startswith("1 listed train image(s) are missing (first: ") and ".extract-" not in partial[0]


# --- FGVC-Aircraft 2013b ------------------------------------------------------------------------------------------

# variants.txt order (the official ids) differs from the alphabetical one, and a name contains '/'.
VARIANTS = {"737-700": ("Boeing 737", "Boeing"), "737-800": ("Boeing 737", "Boeing"),
            "F-16A/B": ("F-16", "Lockheed Martin"), "A340-300": ("A340", "Airbus")}
FAMILIES = ["Boeing 737", "F-16", "A340"]
MAKERS = ["Lockheed Martin", "Boeing", "Airbus"]


def make_aircraft(root: Path) -> Path:
    """fgvc-aircraft-2013b/data/ with the name lists, the images_LEVEL_SPLIT.txt lists and images/ID.jpg
    (3 images per variant: one each in train, val and test; ids with leading zeros as in the release)."""
    d = root / "fgvc-aircraft-2013b" / "data"
    d.mkdir(parents=True)
    (d / "variants.txt").write_text("".join(f"{v}\n" for v in VARIANTS))
    (d / "families.txt").write_text("".join(f"{f}\n" for f in FAMILIES))
    (d / "manufacturers.txt").write_text("".join(f"{m}\n" for m in MAKERS))
    lists = {}
    for v, (variant, (family, maker)) in enumerate(VARIANTS.items()):
        for s, split in enumerate(("train", "val", "test")):
            image_id = f"00{v}{s}123"
            write_image(d / "images" / f"{image_id}.jpg", 10 * v + s)
            for level, name in (("variant", variant), ("family", family), ("manufacturer", maker)):
                for part in ([split, "trainval"] if split != "test" else [split]):
                    lists.setdefault(f"images_{level}_{part}.txt", []).append(f"{image_id} {name}\n")
    for fname, lines in lists.items():
        (d / fname).write_text("".join(lines))
    return root / "fgvc-aircraft-2013b"


def test_aircraft_variants_keep_official_order_and_slashes_become_safe(tmp_path):
    src = make_aircraft(tmp_path / "src")
    before = snapshot(src)
    dst = tmp_path / "aircraft"
    summary = prepare.prepare("aircraft", src, dst, expected=Expected(4, 8, 4))
    assert snapshot(src) == before
    layout = placed(dst)
    assert sorted(layout["train"]) == ["001.737-700", "002.737-800", "003.F-16A_B", "004.A340-300"]
    assert layout["train"]["003.F-16A_B"] == {"0020123.jpg", "0021123.jpg"}  # trainval = train + val
    assert layout["test"]["003.F-16A_B"] == {"0022123.jpg"}
    assert same_file(dst / "test" / "003.F-16A_B" / "0022123.jpg", src / "data" / "images" / "0022123.jpg")
    assert "copyright banner" in summary["notes"][0]
    assert data.check_layout(dst) == sorted(layout["test"])


def test_aircraft_levels_and_train_split(tmp_path, capsys):
    src = make_aircraft(tmp_path / "src")
    family = tmp_path / "family"
    prepare.prepare("aircraft", src, family, level="family", split="train", expected=Expected(3, 4, 4))
    layout = placed(family)
    assert sorted(layout["train"]) == ["001.Boeing_737", "002.F-16", "003.A340"]
    assert layout["train"]["001.Boeing_737"] == {"0000123.jpg", "0010123.jpg"}  # 737-700 and 737-800, no val
    maker = tmp_path / "maker"
    prepare.prepare("aircraft", src, maker, level="manufacturer", expected=Expected(3, 8, 4))
    assert sorted(placed(maker)["test"]) == ["001.Lockheed_Martin", "002.Boeing", "003.Airbus"]
    assert placed(maker)["test"]["002.Boeing"] == {"0002123.jpg", "0012123.jpg"}
    # the same DST with other options is refused, naming the difference
    with pytest.raises(FgicError, match=r"family: was prepared with level 'family' \(now 'variant'\), split 'train' "
                                        r"\(now 'trainval'\); remove it or give another DST"):
        prepare.prepare("aircraft", src, family, expected=Expected(4, 8, 4))
    # the official sizes, per level and split
    code, _, err = in_cli(["aircraft", str(src), str(tmp_path / "x"), "--aircraft-level", "family"], capsys)
    assert code == 2 and "classes 3 (expected 70); train 8 (expected 6,667); test 4 (expected 3,333)" in err
    code, _, err = in_cli(["aircraft", str(src), str(tmp_path / "x"), "--aircraft-level", "manufacturer",
                           "--aircraft-split", "train"], capsys)
    assert code == 2 and "classes 3 (expected 30); train 4 (expected 3,334)" in err


def test_aircraft_label_not_in_the_name_list(tmp_path):
    src = make_aircraft(tmp_path / "src")
    with open(src / "data" / "images_variant_test.txt", "a") as f:
        f.write("0030123 F-16A\n")
    with pytest.raises(FgicError, match=r"images_variant_test.txt: image 0030123 has variant 'F-16A', which "
                                        r"variants.txt does not list"):
        prepare.prepare("aircraft", src, tmp_path / "dst", expected=Expected(4, 8, 5))


# --- Stanford Cars ------------------------------------------------------------------------------------------------

# names.csv order (the official ids, 1-based in the annotations) differs from the alphabetical one.
CARS = ["Volvo XC90 SUV 2007", "AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012"]
CARS_FOLDERS = ["001.Volvo_XC90_SUV_2007", "002.AM_General_Hummer_SUV_2000", "003.Ram_C_V_Cargo_Van_Minivan_2012"]
# (file, 1-based class) per split; train and test reuse file names, as the release does
CARS_ANNOS = {"train": [("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 3), ("00004.jpg", 3)],
              "test": [("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 2)]}


def cars_seed(split, fname):
    return (split == "test") * 100 + int(fname[:5])


def cars_csv_image(root: Path, split: str, fname: str, cls: int, flat: bool = False) -> Path:
    if flat:
        return root / f"cars_{split}" / fname
    return root / "car_data" / "car_data" / split / CARS[cls - 1].replace("/", "-") / fname


def make_cars_csv(root: Path, flat: bool = False) -> Path:
    """The Kaggle-style mirror: names.csv, anno_{train,test}.csv (fname,x1,y1,x2,y2,class; no header) and
    car_data/car_data/{train,test}/CLASS NAME/fname; or (flat) with a header line and cars_{train,test}/fname."""
    root.mkdir(parents=True)
    (root / "names.csv").write_text("".join(f"{n}\n" for n in CARS))
    for split, rows in CARS_ANNOS.items():
        header = "Image Name,x1,y1,x2,y2,Class\n" if flat else ""
        (root / f"anno_{split}.csv").write_text(header + "".join(f"{f},1,2,7,7,{c}\n" for f, c in rows))
        for fname, cls in rows:
            write_image(cars_csv_image(root, split, fname, cls, flat), cars_seed(split, fname))
    return root


def check_cars(src_of, dst: Path):
    """Every annotated image sits in the folder of its 1-based class id, and is the annotated file."""
    layout = placed(dst)
    assert sorted(layout["train"]) == CARS_FOLDERS
    for split, rows in CARS_ANNOS.items():
        for fname, cls in rows:
            assert same_file(dst / split / CARS_FOLDERS[cls - 1] / fname, src_of(split, fname, cls))
    assert sum(len(v) for v in layout["test"].values()) == 3


@pytest.mark.parametrize("flat", [False, True])
def test_cars_csv_layout_uses_one_based_ids(tmp_path, flat):
    src = make_cars_csv(tmp_path / "stanford-car-dataset-by-classes-folder", flat)
    before = snapshot(src)
    dst = tmp_path / "cars"
    prepare.prepare("cars", src, dst, expected=Expected(3, 4, 3))
    assert snapshot(src) == before
    check_cars(lambda s, f, c: cars_csv_image(src, s, f, c, flat), dst)


def test_cars_class_folders_without_list_files_keep_their_sorted_order(tmp_path):
    src = make_cars_csv(tmp_path / "mirror")
    for f in ("names.csv", "anno_train.csv", "anno_test.csv"):
        (src / f).unlink()
    (src / "car_data" / "car_data" / "test" / ".DS_Store").write_text("")
    summary = prepare.prepare("cars", src, tmp_path / "cars", expected=Expected(3, 4, 3))
    assert "no number prefix: kept in their sorted order" in summary["notes"][0]
    assert ImageFolder(str(tmp_path / "cars" / "train")).classes == sorted(n.replace("/", "-") for n in CARS)
    assert summary["origin"].startswith("collated train/test class folders")


def test_collated_numbered_folders_are_ordered_by_number(tmp_path):
    src = tmp_path / "CUB_collated"
    for split, n in (("train", 2), ("test", 1)):
        for c, name in enumerate(["1.Zebra_Finch", "10.Mallard", "2.Laysan_Albatross"]):
            for i in range(n):
                write_image(src / split / name / f"{i}.jpg", 10 * c + i)
    write_image(src / "train" / "10.Mallard" / "batch" / "a.jpg", 90)  # a subfolder's image is one
    write_image(src / "train" / "10.Mallard" / "batch" / ".ipynb_checkpoints" / "a-checkpoint.jpg", 91)  # hidden: none
    dst = tmp_path / "cub"
    prepare.prepare("cub", src, dst, expected=Expected(3, 7, 3))
    assert sorted(p.name for p in (dst / "train" / "010.Mallard").iterdir()) == ["0.jpg", "1.jpg", "batch__a.jpg"]
    assert ImageFolder(str(dst / "test")).classes == ["001.Zebra_Finch", "002.Laysan_Albatross", "010.Mallard"]
    assert same_file(dst / "train" / "010.Mallard" / "1.jpg", src / "train" / "10.Mallard" / "1.jpg")


def make_cars_devkit(root: Path) -> Path:
    """The original release: devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat
    (struct arrays with bbox_*, class, fname), cars_train/ and cars_test/."""
    from scipy.io import savemat
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(CARS, dtype=object)})
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    for split, path in (("train", root / "devkit" / "cars_train_annos.mat"),
                        ("test", root / "cars_test_annos_withlabels.mat")):
        rec = np.zeros(len(CARS_ANNOS[split]), dtype=fields)
        for i, (fname, cls) in enumerate(CARS_ANNOS[split]):
            rec[i] = (1, 2, 7, 7, cls, fname)
            write_image(root / f"cars_{split}" / fname, cars_seed(split, fname))
        savemat(path, {"annotations": rec.reshape(1, -1)})
    return root


@pytest.mark.parametrize("nested", [False, True])
def test_cars_devkit_mat_files(tmp_path, nested):
    """nested: cars_train.tgz extracted into a folder of its own name (cars_train/cars_train/...)."""
    pytest.importorskip("scipy", reason="the .mat path needs the optional scipy (pip install 'fgic[cars]')")
    src = make_cars_devkit(tmp_path / "stanford_cars")
    for split in ("train", "test") if nested else ():
        (src / f"cars_{split}").rename(tmp_path / "images")
        (src / f"cars_{split}").mkdir()
        (tmp_path / "images").rename(src / f"cars_{split}" / f"cars_{split}")
    dst = tmp_path / "cars"
    prepare.prepare("cars", src, dst, expected=Expected(3, 4, 3))
    check_cars(lambda s, f, c: src / f"cars_{s}" / (f"cars_{s}/{f}" if nested else f), dst)
    (src / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(FgicError, match="no cars_test_annos_withlabels.mat next to cars_meta.mat"):
        prepare.prepare("cars", src, tmp_path / "cars2", expected=Expected(3, 4, 3))


def test_cars_devkit_files_are_read_inside_the_source_only(tmp_path):
    """cars_meta.mat at SRC's top: the annotation files one folder up from it would be outside SRC. A file of the same
    name there (another copy, other classes) is not read: SRC's own is."""
    pytest.importorskip("scipy", reason="the .mat path needs the optional scipy (pip install 'fgic[cars]')")
    src = make_cars_devkit(tmp_path / "stanford_cars")
    for name in ("cars_meta.mat", "cars_train_annos.mat"):
        (src / "devkit" / name).rename(src / name)
    (src / "devkit").rmdir()
    decoy = make_cars_devkit(tmp_path / "decoy")  # its test annotations with the classes of other images
    from scipy.io import loadmat, savemat
    mat = loadmat(decoy / "cars_test_annos_withlabels.mat")
    mat["annotations"]["class"] = mat["annotations"]["class"][:, ::-1]
    savemat(tmp_path / "cars_test_annos_withlabels.mat", {"annotations": mat["annotations"]})
    dst = tmp_path / "cars"
    prepare.prepare("cars", src, dst, expected=Expected(3, 4, 3))
    check_cars(lambda s, f, c: src / f"cars_{s}" / f, dst)


def test_cars_annos_mat_with_car_ims(tmp_path):
    """The later single-file release: cars_annos.mat (relative_im_path, class, test; class_names) and car_ims/."""
    pytest.importorskip("scipy", reason="the .mat path needs the optional scipy (pip install 'fgic[cars]')")
    from scipy.io import savemat
    src = tmp_path / "cars196"
    rows = [(f"car_ims/{i + 1:06d}.jpg", cls, int(split == "test"), cars_seed(split, fname))
            for i, (split, fname, cls) in enumerate((s, f, c) for s, r in CARS_ANNOS.items() for f, c in r)]
    rec = np.zeros(len(rows), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for i, (rel, cls, test, seed) in enumerate(rows):
        rec[i] = (rel, cls, test)
        write_image(src / rel, seed)
    savemat(src / "cars_annos.mat", {"annotations": rec.reshape(1, -1), "class_names": np.array(CARS, dtype=object)})
    dst = tmp_path / "cars"
    prepare.prepare("cars", src, dst, expected=Expected(3, 4, 3))
    layout = placed(dst)
    assert sorted(layout["test"]) == CARS_FOLDERS
    for rel, cls, test, _ in rows:
        name = Path(rel).name
        assert same_file(dst / ("test" if test else "train") / CARS_FOLDERS[cls - 1] / name, src / rel)


def test_cars_mat_without_scipy_is_one_clear_line(tmp_path, monkeypatch):
    src = tmp_path / "stanford_cars"
    (src / "devkit").mkdir(parents=True)
    (src / "devkit" / "cars_meta.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    with pytest.raises(FgicError, match=r"cars_meta.mat: reading the Stanford Cars .mat files needs scipy "
                                        r"\(pip install scipy"):
        prepare.prepare("cars", src, tmp_path / "cars", expected=Expected(3, 4, 3))


@pytest.mark.e2e
def test_command_line_entry(tmp_path):
    src = make_cars_csv(tmp_path / "mirror")
    env = fgic_env()
    env.pop("FGIC_DATA", None)
    res = subprocess.run([sys.executable, "-m", "fgic.prepare", "cars", str(src), "--allow-partial"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "3 classes, 4 train / 3 test images (partial)" in res.stdout
    assert "python -m fgic.ddp -d cars" in res.stdout
    assert sorted(placed(tmp_path / "data" / "cars")["test"]) == CARS_FOLDERS
