"""fgic.prepare on miniature NABirds, Stanford Dogs, Oxford Flowers-102 and Oxford-IIIT Pets releases written here in
the official layouts and formats (list files as the releases write them, .mat files with scipy)."""
from __future__ import annotations

import json
import re
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from fgic import data, prepare
from fgic.errors import FgicError
from fgic.prepare import Expected
from fgic.releases import FLOWERS
from tests.helpers import interrupt_prepare_after, optional, run_fgic, tiny_args
from tests.test_prepare import in_cli, placed, same_file, snapshot, write_image

# --- NABirds ------------------------------------------------------------------------------------------------------

# classes.txt holds the hierarchy's inner nodes too (0 Birds, 1 Perching Birds, ...); images carry leaf ids only.
# The leaf ids are listed out of order and their id order is not their alphabetical one.
NABIRDS_NODES = {0: "Birds", 1: "Perching Birds", 22: "Hummingbirds", 817: "Oak Titmouse",
                 295: "Black-chinned Hummingbird (Adult Male)", 1010: "Western Grebe/Clark's Grebe"}
NABIRDS_LEAVES = (295, 817, 1010)
NABIRDS_FOLDERS = ["001.Black-chinned_Hummingbird_Adult_Male", "002.Oak_Titmouse", "003.Western_Grebe_Clark_s_Grebe"]


def make_nabirds(root: Path, per_class=(2, 1)) -> tuple[Path, dict]:
    """nabirds/ with classes.txt (every hierarchy node), images.txt ('UUID 0295/UUIDHEX.jpg'), image_class_labels.txt,
    train_test_split.txt (1 = train), hierarchy.txt and images/NNNN/. Returns it and {uuid: (split, leaf id)}."""
    nab = root / "nabirds"
    nab.mkdir(parents=True)
    (nab / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in NABIRDS_NODES.items()))
    (nab / "hierarchy.txt").write_text("1 0\n22 0\n817 1\n295 22\n1010 0\n")
    rng = np.random.default_rng(0)
    truth, lines = {}, {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
    for k, (cid, j) in enumerate((c, j) for c in (1010, 295, 817) for j in range(sum(per_class))):
        uid = str(uuid.UUID(bytes=rng.bytes(16)))
        rel = f"{cid:04d}/{uid.replace('-', '')}.jpg"
        write_image(nab / "images" / rel, k)
        train = j < per_class[0]
        lines["images.txt"].append(f"{uid} {rel}\n")
        lines["image_class_labels.txt"].append(f"{uid} {cid}\n")
        lines["train_test_split.txt"].append(f"{uid} {int(train)}\n")
        truth[uid] = ("train" if train else "test", cid, rel)
    for fname, rows in lines.items():
        (nab / fname).write_text("".join(rows))
    return nab, truth


def test_nabirds_keeps_the_leaf_classes_in_id_order_with_readable_names(tmp_path):
    nab, truth = make_nabirds(tmp_path / "src")
    before = snapshot(nab)
    dst = tmp_path / "data" / "nabirds"
    summary = prepare.prepare("nabirds", nab, dst, expected=Expected(3, 6, 3))
    assert snapshot(nab) == before
    assert sorted(placed(dst)["train"]) == sorted(placed(dst)["test"]) == NABIRDS_FOLDERS
    for split, cid, rel in truth.values():
        folder = NABIRDS_FOLDERS[NABIRDS_LEAVES.index(cid)]
        assert same_file(dst / split / folder / Path(rel).name, nab / "images" / rel)
    assert "the 3 classes that images.txt's images carry, of the 6 in classes.txt" in summary["notes"][0]
    assert data.check_layout(dst) == NABIRDS_FOLDERS


def test_nabirds_archive_and_the_official_counts(tmp_path, capsys):
    nab, _ = make_nabirds(tmp_path / "src")
    archive = tmp_path / "nabirds.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(nab, arcname="nabirds")
    code, _, err = in_cli(["nabirds", str(archive), str(tmp_path / "dst")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"nabirds from NABirds list files in {archive}/nabirds: classes 3 (expected 555); train 6 (expected " \
           f"23,929); test 3 (expected 24,633)" in err
    assert not (tmp_path / "dst").exists() and [p.name for p in tmp_path.iterdir()] == ["src", "nabirds.tar.gz"]
    summary = prepare.prepare("nabirds", archive, tmp_path / "dst", expected=Expected(3, 6, 3))
    assert summary["train"] == 6 and sorted(placed(tmp_path / "dst")["test"]) == NABIRDS_FOLDERS


# --- Stanford Dogs ------------------------------------------------------------------------------------------------

# (WordNet-id folder, 1-based label); the label order is the official one.
DOGS = [("n02085620-Chihuahua", 1), ("n02085782-Japanese_spaniel", 2), ("n02116738-African_hunting_dog", 3)]
DOGS_FOLDERS = ["001.Chihuahua", "002.Japanese_spaniel", "003.African_hunting_dog"]


def make_dogs(root: Path, per_class=(2, 1)) -> Path:
    """Images/WNID-Breed/WNID_N.jpg and lists/{train,test,file}_list.mat as the release's lists.tar holds them:
    file_list and annotation_list as N x 1 cell arrays, labels as an N x 1 double array (1-based)."""
    from scipy.io import savemat
    dogs = root / "stanford_dogs"
    rows = {"train": [], "test": []}
    k = 0
    for folder, label in DOGS:
        for j in range(sum(per_class)):
            k += 1
            rel = f"{folder}/{folder.split('-')[0]}_{1000 + k}.jpg"
            write_image(dogs / "Images" / rel, k)
            rows["train" if j < per_class[0] else "test"].append((rel, label))
    (dogs / "lists").mkdir()
    for name, part in (("train", rows["train"]), ("test", rows["test"]), ("file", rows["train"] + rows["test"])):
        cells = np.empty((len(part), 1), dtype=object)
        annos = np.empty((len(part), 1), dtype=object)
        for i, (rel, _) in enumerate(part):
            cells[i, 0] = rel
            annos[i, 0] = rel[:-4]
        savemat(dogs / "lists" / f"{name}_list.mat", {"file_list": cells, "annotation_list": annos,
                                                      "labels": np.array([[float(lb)] for _, lb in part])})
    return dogs


def test_dogs_mat_lists_give_breed_folders_in_label_order(tmp_path):
    optional("scipy")
    dogs = make_dogs(tmp_path / "src")
    before = snapshot(dogs)
    dst = tmp_path / "dogs"
    prepare.prepare("dogs", dogs, dst, expected=Expected(3, 6, 3))
    assert snapshot(dogs) == before
    layout = placed(dst)
    assert sorted(layout["train"]) == DOGS_FOLDERS
    assert layout["test"]["003.African_hunting_dog"] == {"n02116738_1009.jpg"}
    assert same_file(dst / "train" / "002.Japanese_spaniel" / "n02085782_1004.jpg",
                     dogs / "Images" / "n02085782-Japanese_spaniel" / "n02085782_1004.jpg")
    assert ImageFolder(str(dst / "test")).class_to_idx == {f: i for i, f in enumerate(DOGS_FOLDERS)}


# --- Oxford Flowers-102 -------------------------------------------------------------------------------------------

def make_flowers(root: Path) -> tuple[Path, dict]:
    """jpg/image_NNNNN.jpg (from 102flowers.tgz), imagelabels.mat ('labels', 1 x N, 1-based) and setid.mat ('trnid',
    'valid', 'tstid', 1 x K image numbers): one image of each class in each of the three parts, shuffled."""
    from scipy.io import savemat
    src = root / "flowers102"
    order = np.random.default_rng(1).permutation(3 * len(FLOWERS))
    labels = np.zeros(len(order))
    parts = {"trnid": [], "valid": [], "tstid": []}
    for slot, n in enumerate(order + 1):
        labels[n - 1] = slot % len(FLOWERS) + 1
        parts[("trnid", "valid", "tstid")[slot // len(FLOWERS)]].append(n)
        write_image(src / "jpg" / f"image_{n:05d}.jpg", int(n))
    savemat(src / "imagelabels.mat", {"labels": labels.reshape(1, -1)})
    savemat(src / "setid.mat", {k: np.array(sorted(v), dtype=np.uint16).reshape(1, -1) for k, v in parts.items()})
    return src, {"labels": labels, **parts}


def test_flowers_trains_on_train_plus_val_with_the_published_names(tmp_path):
    optional("scipy")
    src, truth = make_flowers(tmp_path / "src")
    dst = tmp_path / "flowers"
    summary = prepare.prepare("flowers", src, dst, expected=Expected(102, 204, 102))
    assert summary["classes"] == 102 and "the published list" in summary["notes"][0]
    layout = placed(dst)
    folders = sorted(layout["train"])
    assert folders[0] == "001.pink_primrose" and folders[11] == "012.colt_s_foot"
    assert folders[59] == "060.pink-yellow_dahlia" and folders[-1] == "102.blackberry_lily"
    for split, numbers in (("train", truth["trnid"] + truth["valid"]), ("test", truth["tstid"])):
        for n in numbers:
            folder = folders[int(truth["labels"][n - 1]) - 1]
            assert same_file(dst / split / folder / f"image_{n:05d}.jpg", src / "jpg" / f"image_{n:05d}.jpg")
    assert sum(len(v) for v in layout["test"].values()) == 102


def test_flowers_names_are_the_published_102():
    assert len(FLOWERS) == len(set(FLOWERS)) == 102
    assert FLOWERS[:3] == ("pink primrose", "hard-leaved pocket orchid", "canterbury bells")
    assert FLOWERS[-2:] == ("trumpet creeper", "blackberry lily")


# --- Oxford-IIIT Pets ---------------------------------------------------------------------------------------------

# (CLASS-ID, breed): capitalised breeds are cats, lowercase dogs; a breed name holds underscores
PETS = [(1, "Abyssinian"), (2, "american_bulldog"), (3, "american_pit_bull_terrier"), (6, "Bengal")]
PETS_FOLDERS = ["001.Abyssinian", "002.american_bulldog", "003.american_pit_bull_terrier", "004.Bengal"]


def make_pets(root: Path, per_class=(2, 1)) -> Path:
    """images/Breed_N.jpg (images.tar.gz) and annotations/{list,trainval,test}.txt (annotations.tar.gz): lines
    'Image CLASS-ID SPECIES BREED-ID', list.txt with its '#' header."""
    pets = root / "oxford-iiit-pet"
    lists = {"trainval": [], "test": []}
    for cid, breed in PETS:
        for j in range(sum(per_class)):
            stem = f"{breed}_{100 + j}"
            write_image(pets / "images" / f"{stem}.jpg", 10 * cid + j)
            species = 1 if breed[0].isupper() else 2
            lists["trainval" if j < per_class[0] else "test"].append(f"{stem} {cid} {species} {cid}\n")
    (pets / "images" / "Abyssinian_100.mat").write_bytes(b"stray")  # the release's images/ holds a few .mat files
    (pets / "annotations").mkdir()
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    (pets / "annotations" / "list.txt").write_text(header + "".join(lists["trainval"] + lists["test"]))
    for name, rows in lists.items():
        (pets / "annotations" / f"{name}.txt").write_text("".join(rows))
    return pets


PETS_SIZES = Expected(4, 8, 4)


def test_pets_breeds_in_class_id_order(tmp_path):
    pets = make_pets(tmp_path / "src")
    before = snapshot(pets)
    dst = tmp_path / "pets"
    prepare.prepare("pets", pets, dst, expected=PETS_SIZES)
    assert snapshot(pets) == before
    layout = placed(dst)
    assert sorted(layout["train"]) == PETS_FOLDERS
    assert layout["train"]["003.american_pit_bull_terrier"] == {"american_pit_bull_terrier_100.jpg",
                                                                "american_pit_bull_terrier_101.jpg"}
    assert layout["test"]["004.Bengal"] == {"Bengal_102.jpg"}
    assert same_file(dst / "test" / "001.Abyssinian" / "Abyssinian_102.jpg", pets / "images" / "Abyssinian_102.jpg")


def test_pets_comment_lines_are_skipped_and_a_breed_split_across_ids_is_refused(tmp_path):
    pets = make_pets(tmp_path / "src")
    test_list = pets / "annotations" / "test.txt"
    test_list.write_text("#Image CLASS-ID SPECIES BREED ID\n" + test_list.read_text())
    prepare.prepare("pets", pets, tmp_path / "pets", expected=PETS_SIZES)
    with open(test_list, "a") as f:
        f.write("Bengal_199 2 1 6\n")
    with pytest.raises(FgicError, match=r"test.txt line 6: class 2 is 'american_bulldog' elsewhere but 'Bengal' "
                                        r"here; the list files are not the official ones"):
        prepare.prepare("pets", pets, tmp_path / "pets2", expected=Expected(4, 8, 5))


def test_pets_interrupted_prepare_restarts_cleanly(tmp_path, monkeypatch, capsys):
    pets = make_pets(tmp_path / "src")
    root = tmp_path / "data"
    interrupt_prepare_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare("pets", pets, root / "pets", expected=PETS_SIZES)
    assert list(root.iterdir()) == []  # neither DST nor the half-built folder
    with pytest.raises(FgicError, match="-d pets: no dataset at .*; prepare it with `python -m fgic.prepare pets "):
        data.resolve("pets", str(root))
    monkeypatch.undo()
    (root / ".pets.prepare-killed" / "train").mkdir(parents=True)  # what a kill -9 would leave
    summary = prepare.prepare("pets", pets, root / "pets", expected=PETS_SIZES)
    assert ".pets.prepare-killed is left from an interrupted prepare" in capsys.readouterr().err
    assert summary["train"] == 8 and json.loads((root / "pets" / prepare.MARKER).read_text())["dataset"] == "pets"
    assert data.resolve("pets", str(root)) == ("pets", root / "pets")
    prepare.prepare("pets", pets, root / "pets", expected=PETS_SIZES)
    assert "already prepared" in capsys.readouterr().out


# --- all four: the official counts and the one-line refusals ------------------------------------------------------

def make(name: str, root: Path) -> Path:
    if name in ("dogs", "flowers"):
        optional("scipy")
    if name == "nabirds":
        return make_nabirds(root)[0]
    return {"dogs": make_dogs, "flowers": lambda r: make_flowers(r)[0], "pets": make_pets}[name](root)


@pytest.mark.parametrize("name,counts", [
    ("nabirds", "classes 3 (expected 555); train 6 (expected 23,929); test 3 (expected 24,633)"),
    ("dogs", "classes 3 (expected 120); train 6 (expected 12,000); test 3 (expected 8,580)"),
    ("flowers", "train 204 (expected 2,040); test 102 (expected 6,149)"),
    ("pets", "classes 4 (expected 37); train 8 (expected 3,680); test 4 (expected 3,669)"),
])
def test_official_counts_are_checked_in_one_line(tmp_path, capsys, name, counts):
    src = make(name, tmp_path / "src")
    code, _, err = in_cli([name, str(src), str(tmp_path / name)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f": {counts}; give the complete release, or pass --allow-partial" in err, err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name,damage,message", [
    ("nabirds", "train_test_split.txt", r"nabirds/train_test_split.txt: missing"),
    ("nabirds", "images/1010", r"2 listed train image\(s\) are missing \(first: .*nabirds/images/1010/"),
    ("dogs", "lists/test_list.mat", r"lists/test_list.mat: missing"),
    ("dogs", "Images/n02085620-Chihuahua/n02085620_1003.jpg", r"1 listed test image\(s\) are missing"),
    ("dogs", "Images", r"no Images/ folder holding n02085620-Chihuahua; extract images.tar next to the list files"),
    ("flowers", "setid.mat", r"flowers102/setid.mat: missing"),
    ("flowers", "jpg", r"no jpg/ folder holding image_\d{5}.jpg; extract 102flowers.tgz"),
    ("pets", "annotations/test.txt", r"annotations/test.txt: missing"),
    ("pets", "images/Bengal_101.jpg", r"1 listed train image\(s\) are missing \(first: .*images/Bengal_101.jpg\)"),
    ("pets", "annotations", r"no pets release found; give a folder with images/ and annotations/"),
])
def test_a_missing_file_is_one_line(tmp_path, capsys, name, damage, message):
    src = make(name, tmp_path / "src")
    target = src / damage
    if target.is_dir():
        for f in sorted(target.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        target.rmdir()
    else:
        target.unlink()
    code, _, err = in_cli([name, str(src), str(tmp_path / name)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / name).exists()


def test_a_dogs_list_from_elsewhere_is_refused(tmp_path):
    optional("scipy")
    from scipy.io import savemat
    dogs = make_dogs(tmp_path / "src")
    savemat(dogs / "lists" / "test_list.mat", {"file_list": np.array([["n02085620-Chihuahua/x.jpg"]], dtype=object),
                                               "labels": np.array([[2.0]])})
    with pytest.raises(FgicError, match=r"test_list.mat: label 2 has images in n02085782-Japanese_spaniel/ and "
                                        r"n02085620-Chihuahua/; the list files are not the official ones"):
        prepare.prepare("dogs", dogs, tmp_path / "dogs", expected=Expected(3, 6, 1))
    savemat(dogs / "lists" / "test_list.mat", {"file_list": np.array([["a.jpg"]], dtype=object)})
    with pytest.raises(FgicError, match=r"test_list.mat: has no 'labels' variable; is this Stanford Dogs' lists.tar"):
        prepare.prepare("dogs", dogs, tmp_path / "dogs", expected=Expected(3, 6, 1))


def test_flowers_setid_beyond_imagelabels_is_refused(tmp_path):
    optional("scipy")
    from scipy.io import savemat
    src, truth = make_flowers(tmp_path / "src")
    savemat(src / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]), "tstid": np.array([[400]])})
    with pytest.raises(FgicError, match=r"setid.mat: image 400 is outside 1..306 \(imagelabels.mat's images\)"):
        prepare.prepare("flowers", src, tmp_path / "flowers", expected=Expected(102, 3, 1))


@pytest.mark.e2e
def test_prepared_pets_trains_by_name(tmp_path):
    """-d NAME for the new datasets: one short run (the registry, data.resolve and the run folder are shared)."""
    root = tmp_path / "data"
    prepare.prepare("pets", make_pets(tmp_path / "src", per_class=(3, 2)), root / "pets", expected=Expected(4, 12, 8))
    res = run_fgic(["-d", "pets", "--data-root", str(root), *tiny_args(epochs=1, batch_size=4, resize=40, crop=32),
                    "--output-dir", str(tmp_path / "runs")])
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "pets" / "resnet18-off-s2020"
    assert json.loads((run / "summary.json").read_text())["test_total"] == 8
    assert json.loads((run / "config.json").read_text())["dataset"] == "pets"
