"""Readers of the CUB-200-2011, FGVC-Aircraft, Stanford Cars, NABirds, Stanford Dogs, Oxford Flowers-102 and
Oxford-IIIT Pets releases (and of collated train/test folders) into one ordered class list and the image files of
each split."""
from __future__ import annotations

import csv
import os
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fgic import images
from fgic.errors import FgicError

SPLITS = ("train", "test")
NAME_LISTS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}  # Aircraft


@dataclass
class Release:
    """What a reader found: class folder names in official class-id order, and per split (source file, class index,
    file name in the class folder) triples; `missing` holds listed files that are not there."""
    origin: str
    classes: list[str]
    items: dict[str, list[tuple[Path, int, str]]]
    missing: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def safe_name(name: str) -> str:
    """A readable, filesystem-safe folder name: runs of anything but letters, digits and . _ + - become '_'
    ('F-16A/B' -> 'F-16A_B', 'AM General Hummer SUV 2000' -> 'AM_General_Hummer_SUV_2000')."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name.strip()).strip("_.") or "class"


def class_folders(names: list[str]) -> list[str]:
    """Folder names in the given order, '001.NAME' style: the zero-padded prefix makes the sorted order (which
    ImageFolder numbers) the official one. A name already carrying its own index prefix (CUB's) keeps it."""
    width = max(3, len(str(len(names))))
    out = []
    for i, name in enumerate(names, 1):
        bare = re.sub(rf"^0*{i}\.", "", name.strip())
        out.append(f"{i:0{width}d}.{safe_name(bare)}")
    return out


def find_dir(src: Path, *names: str, depth: int = 4, called: str | None = None) -> Path | None:
    """The shallowest folder at or under src (breadth first, at most `depth` levels down) holding all `names` (and
    itself named `called`, when given)."""
    queue = deque([(src, 0)])
    while queue:
        folder, level = queue.popleft()
        try:
            entries = {e.name: e for e in os.scandir(folder)}
        except OSError:
            continue
        if all(n in entries for n in names) and called in (None, folder.name):
            return folder
        if level < depth:
            queue.extend((Path(e.path), level + 1) for e in sorted(entries.values(), key=lambda e: e.name)
                         if e.is_dir() and not e.name.startswith("."))
    return None


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) of the non-empty lines of a list file; a missing file is a one-line error."""
    if not path.is_file():
        raise FgicError(f"{path}: missing; it is part of the official release, re-extract the archive "
                        f"(or pass the folder that holds it)")
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def _pairs(path: Path, what: str) -> list[tuple[str, str]]:
    """Lines 'KEY VALUE...' split at the first whitespace (values may contain spaces)."""
    out = []
    for n, line in _lines(path):
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise FgicError(f"{path} line {n}: expected '{what}', got {line[:60]!r}; is this the official file?")
        out.append((parts[0], parts[1]))
    return out


def _collect(items: dict, missing: dict, split: str, path: Path, label: int, name: str) -> None:
    if path.is_file():
        items[split].append((path, label, name))
    else:
        missing[split].append(path)


def read_cub(src: Path) -> Release | None:
    """CUB_200_2011/: classes.txt, images.txt, image_class_labels.txt, train_test_split.txt and images/."""
    root = find_dir(src, "images.txt") or find_dir(src, "classes.txt")
    if root is None:
        return None
    names, items, missing = _id_lists(root, "CUB_200_2011.tgz", leaves_only=False)
    return Release(f"CUB-200-2011 list files in {root}", class_folders(names), items, missing)


def read_nabirds(src: Path) -> Release | None:
    """nabirds/: CUB's list files with image ids that are UUIDs; classes.txt lists all 1,011 nodes of the hierarchy,
    the images carry only the 555 leaf classes (numbered here in id order)."""
    root = find_dir(src, "images.txt") or find_dir(src, "classes.txt")
    if root is None:
        return None
    names, items, missing = _id_lists(root, "nabirds.tar.gz", leaves_only=True)
    return Release(f"NABirds list files in {root}", class_folders(names), items, missing,
                   [f"the {len(names)} classes that images.txt's images carry, of the "
                    f"{len(_lines(root / 'classes.txt'))} in classes.txt (the hierarchy's inner nodes have none)"])


def _id_lists(root: Path, archive: str, leaves_only: bool) -> tuple[list[str], dict, dict]:
    """CUB-style list files: 'CLASS_ID NAME' (classes.txt), 'IMAGE_ID PATH' (images.txt), 'IMAGE_ID CLASS_ID',
    'IMAGE_ID 1|0' (1 = train). The class names in id order (leaves_only: only the classes some image has), and the
    items and missing files of each split."""
    classes = _pairs(root / "classes.txt", "CLASS_ID CLASS_NAME")
    images = dict(_pairs(root / "images.txt", "IMAGE_ID PATH"))
    labels = dict(_pairs(root / "image_class_labels.txt", "IMAGE_ID CLASS_ID"))
    is_train = dict(_pairs(root / "train_test_split.txt", "IMAGE_ID 1|0"))
    classes.sort(key=lambda c: _int(c[0], root / "classes.txt"))
    if leaves_only:
        used = {labels[i] for i in images if i in labels}
        classes = [c for c in classes if c[0] in used]
    index = {cid: i for i, (cid, _) in enumerate(classes)}
    items, missing = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    for image_id, rel in images.items():
        for table, fname in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise FgicError(f"{root / fname}: no line for image {image_id} of images.txt; the list files do not "
                                f"belong together, re-extract {archive}")
        if labels[image_id] not in index:
            raise FgicError(f"{root / 'image_class_labels.txt'}: image {image_id} has class {labels[image_id]}, "
                            f"which classes.txt does not list")
        if is_train[image_id] not in ("0", "1"):
            raise FgicError(f"{root / 'train_test_split.txt'}: image {image_id} is {is_train[image_id]!r}; "
                            f"expected 1 (train) or 0 (test)")
        split = "train" if is_train[image_id] == "1" else "test"
        _collect(items, missing, split, root / "images" / rel, index[labels[image_id]], Path(rel).name)
    return [name for _, name in classes], items, missing


def _int(text: str, path: Path) -> int:
    try:
        return int(text)
    except ValueError:
        raise FgicError(f"{path}: {text!r} is not a number where an id should be; is this the official file?") from None


def read_aircraft(src: Path, level: str, split: str) -> Release | None:
    """fgvc-aircraft-2013b/data/: {variants,families,manufacturers}.txt (one name a line, in class-id order),
    images_LEVEL_{trainval,train,test}.txt ('IMAGE_ID Name with spaces') and images/IMAGE_ID.jpg."""
    root = find_dir(src, "variants.txt") or find_dir(src, "images_variant_test.txt")
    if root is None:
        return None
    names_file = root / NAME_LISTS[level]
    names = [line for _, line in _lines(names_file)]
    if len(set(names)) != len(names):
        raise FgicError(f"{names_file}: a name is listed twice; is this the official file?")
    index = {name: i for i, name in enumerate(names)}
    items, missing = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    for part, list_split in ((split, "train"), ("test", "test")):
        list_file = root / f"images_{level}_{part}.txt"
        for image_id, name in _pairs(list_file, "IMAGE_ID NAME"):
            if name not in index:
                raise FgicError(f"{list_file}: image {image_id} has {level} {name!r}, which {names_file.name} does "
                                f"not list; the files do not belong together, re-extract the archive")
            _collect(items, missing, list_split, root / "images" / f"{image_id}.jpg", index[name], f"{image_id}.jpg")
    notes = ["images kept as released, with the copyright banner at the bottom (crop it in the model's input "
             "pipeline if wanted)"]
    return Release(f"FGVC-Aircraft list files in {root} ({level}, {split}/test)", class_folders(names), items,
                   missing, notes)


def read_cars(src: Path) -> Release | None:
    """Stanford Cars: the devkit .mat files (cars_meta.mat, cars_train_annos.mat, cars_test_annos_withlabels.mat,
    cars_train/, cars_test/), cars_annos.mat with car_ims/, or the CSV mirror (names.csv, anno_train.csv,
    anno_test.csv and the images somewhere below, e.g. in class folders). Class ids are 1-based in all of them."""
    meta = find_dir(src, "cars_meta.mat")
    if meta is not None:
        return _cars_devkit(src, meta)
    full = find_dir(src, "cars_annos.mat")
    if full is not None:
        return _cars_annos(full)
    csv_root = find_dir(src, "names.csv")
    if csv_root is not None:
        return _cars_csv(src, csv_root)
    return None


def _loadmat(path: Path, release: str = "Stanford Cars", instead: str = "the CSV or class-folder layout") -> dict:
    try:
        from scipy.io import loadmat  # noqa: PLC0415  (scipy: an optional extra, for the .mat files only)
    except ImportError:
        raise FgicError(f"{path}: reading the {release} .mat files needs scipy (pip install scipy); or give "
                        f"{instead}") from None
    if not path.is_file():
        raise FgicError(f"{path}: missing; it is part of the official release, download or extract it there")
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as exc:  # scipy raises several types for a damaged or foreign file
        raise FgicError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {str(exc)[:80]}); "
                        f"re-download it") from None


def _mat_field(path: Path, var: str, mat: dict | None = None, release: str = "the Stanford Cars devkit") -> list:
    mat = _loadmat(path) if mat is None else mat
    if var not in mat:
        raise FgicError(f"{path}: has no {var!r} variable; is this {release}'s file?")
    return list(np.atleast_1d(mat[var]))


def _mat_annotations(path: Path, fields: tuple[str, ...], mat: dict | None = None) -> list[tuple]:
    annos = _mat_field(path, "annotations", mat)
    if annos and not all(f in (annos[0].dtype.names or ()) for f in fields):
        raise FgicError(f"{path}: annotations lack {'/'.join(fields)}; for the test split use "
                        f"cars_test_annos_withlabels.mat (cars_test_annos.mat has no classes)")
    return [tuple(a[f].item() if hasattr(a[f], "item") else a[f] for f in fields) for a in annos]


def _cars_devkit(src: Path, meta: Path) -> Release:
    names = [str(n) for n in _mat_field(meta / "cars_meta.mat", "class_names")]
    annos = {}
    for split, pattern in (("train", "cars_train_annos*.mat"), ("test", "cars_test_annos_withlabels*.mat")):
        inside = {d for d in (meta, meta.parent, src) if d == src or src in d.parents}  # never a folder above SRC's
        found = sorted(p for d in inside for p in d.glob(pattern))
        if not found:
            raise FgicError(f"{meta}: no {pattern.replace('*', '')} next to cars_meta.mat (or one folder up, in "
                            f"{src}); the devkit and cars_test_annos_withlabels.mat are needed")
        annos[split] = (found[0], _mat_annotations(found[0], ("fname", "class")))
    items, missing = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    for split, (path, rows) in annos.items():
        images = _image_dir(src, f"cars_{split}", str(rows[0][0]) if rows else "")
        for fname, cls in rows:
            label = _class_index(int(cls), len(names), path)
            _collect(items, missing, split, images / str(fname), label, str(fname))
    return Release(f"Stanford Cars devkit in {meta}", class_folders(names), items, missing)


def _image_dir(src: Path, folder: str, first: str, archive: str | None = None) -> Path:
    """The `folder` (e.g. cars_train) under src that holds the images, also when nested (cars_train/cars_train)."""
    found = find_dir(src, *([first] if first else []), called=folder) or find_dir(src, called=folder)
    if found is not None:  # without `first` (absent from a partial release): the shallowest such folder
        return found
    raise FgicError(f"{src}: no {folder}/ folder holding {first or 'the images'}; extract {archive or folder + '.tgz'} "
                    f"next to the {'list files' if archive else 'devkit'}")


def _class_index(cls: int, n: int, path: Path) -> int:
    """The official 1-based class id as a 0-based index (the classic off-by-one of the Cars files)."""
    if not 1 <= cls <= n:
        raise FgicError(f"{path}: class id {cls} is outside 1..{n} (the ids are 1-based, one per class name)")
    return cls - 1


def _cars_annos(root: Path) -> Release:
    path = root / "cars_annos.mat"
    mat = _loadmat(path)  # read once: class names and annotations
    names = [str(n) for n in _mat_field(path, "class_names", mat)]
    items, missing = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    for rel, cls, test in _mat_annotations(path, ("relative_im_path", "class", "test"), mat):
        split = "test" if int(test) else "train"
        label = _class_index(int(cls), len(names), path)
        _collect(items, missing, split, root / str(rel), label, Path(str(rel)).name)
    return Release(f"Stanford Cars cars_annos.mat in {root}", class_folders(names), items, missing)


def _cars_csv(src: Path, root: Path) -> Release:
    with open(root / "names.csv", newline="", encoding="utf-8-sig") as f:
        names = [",".join(row).strip() for row in csv.reader(f) if row and "".join(row).strip()]
    items, missing = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    for split in SPLITS:
        path = root / f"anno_{split}.csv"
        rows = _csv_rows(path)
        files = _files_by_name(src, split)
        for fname, cls in rows:
            label = _class_index(cls, len(names), path)
            found = files.get(fname)
            if found is None:
                missing[split].append(Path(split) / fname)
            else:
                items[split].append((found, label, fname))
    return Release(f"Stanford Cars CSV files in {root}", class_folders(names), items, missing)


def _csv_rows(path: Path) -> list[tuple[str, int]]:
    """(file name, 1-based class id) from 'fname,x1,y1,x2,y2,class' rows; a header line is allowed."""
    if not path.is_file():
        raise FgicError(f"{path}: missing; the CSV layout needs names.csv, anno_train.csv and anno_test.csv together")
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 6 or not row[-1].strip().isdigit():
                if n == 1 and len(row) >= 6:
                    continue  # a header
                raise FgicError(f"{path} line {n}: expected 'fname,x1,y1,x2,y2,class', got {','.join(row)[:60]!r}")
            out.append((os.path.basename(row[0].strip()), int(row[-1])))
    return out


def _files_by_name(src: Path, split: str) -> dict[str, Path]:
    """Image files by file name under the split's folder: `train/` (with class folders or flat, next to `test/`) or
    `cars_train/`, found anywhere under src."""
    top = find_dir(src, "train", "test")
    folder = top / split if top is not None else None
    if folder is None:
        parent = find_dir(src, f"cars_{split}")
        folder = parent / f"cars_{split}" if parent is not None else None
    if folder is None or not folder.is_dir():
        raise FgicError(f"{src}: no train/ and test/ (or cars_train/ and cars_test/) image folders next to the CSV "
                        f"files; extract the images there too")
    files = {}
    for here, _, names in os.walk(folder):
        for name in names:
            files.setdefault(name, Path(here) / name)
    return files


def read_dogs(src: Path) -> Release | None:
    """Stanford Dogs: lists/{train,test}_list.mat ('file_list': 'n02085620-Chihuahua/n02085620_5927.jpg', 'labels':
    1-based class ids) and Images/WNID-Breed/. Classes in label order, named by their folder without the WordNet id."""
    lists = find_dir(src, "train_list.mat") or find_dir(src, "test_list.mat")
    if lists is None:
        return None
    rows = {}
    for split in SPLITS:
        path = lists / f"{split}_list.mat"
        mat = _loadmat(path, "Stanford Dogs", "a folder with train/ and test/ class folders")
        files = [str(f) for f in _mat_field(path, "file_list", mat, "Stanford Dogs' lists.tar")]
        labels = [int(n) for n in _mat_field(path, "labels", mat, "Stanford Dogs' lists.tar")]
        if len(files) != len(labels):
            raise FgicError(f"{path}: {len(files)} files but {len(labels)} labels; re-extract lists.tar")
        rows[split] = (path, list(zip(files, labels)))
    folders = {}  # 1-based label -> the breed folder of its images
    for path, pairs in rows.values():
        for rel, label in pairs:
            folder = rel.replace("\\", "/").split("/")[0]
            if folders.setdefault(label, folder) != folder:
                raise FgicError(f"{path}: label {label} has images in {folders[label]}/ and {folder}/; the list files "
                                f"are not the official ones")
    order = sorted(folders)
    index = {label: i for i, label in enumerate(order)}
    first = next((pairs[0][0] for _, pairs in rows.values() if pairs), "")
    images = _image_dir(src, "Images", first.replace("\\", "/").split("/")[0], "images.tar")
    items, missing = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    for split, (_, pairs) in rows.items():
        for rel, label in pairs:
            rel = rel.replace("\\", "/")
            _collect(items, missing, split, images / rel, index[label], Path(rel).name)
    names = [re.sub(r"^n\d+-", "", folders[label]) for label in order]
    return Release(f"Stanford Dogs lists in {lists}", class_folders(names), items, missing)


# The Oxford Flowers-102 class names in label order (the release has numbers only): the list of the VGG category page
# as torchvision, TensorFlow Datasets and CLIP's prompts carry it.
FLOWERS = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)


def read_flowers(src: Path) -> Release | None:
    """Oxford Flowers-102: imagelabels.mat ('labels', 1-based, one per image), setid.mat ('trnid', 'valid', 'tstid':
    1-based image numbers) and jpg/image_NNNNN.jpg. Train is trnid + valid (2,040), test is tstid (6,149)."""
    root = find_dir(src, "imagelabels.mat") or find_dir(src, "setid.mat")
    if root is None:
        return None
    how = "a folder with train/ and test/ class folders"
    labels = [int(n) for n in _mat_field(root / "imagelabels.mat", "labels",
                                         _loadmat(root / "imagelabels.mat", "Oxford Flowers-102", how),
                                         "Oxford Flowers-102's imagelabels.mat")]
    ids = _loadmat(root / "setid.mat", "Oxford Flowers-102", how)
    parts = {v: [int(n) for n in _mat_field(root / "setid.mat", v, ids, "Oxford Flowers-102's setid.mat")]
             for v in ("trnid", "valid", "tstid")}
    if labels and not 1 <= min(labels) <= max(labels) <= len(FLOWERS):
        raise FgicError(f"{root / 'imagelabels.mat'}: labels outside 1..{len(FLOWERS)}; re-download it")
    images = _image_dir(src, "jpg", f"image_{parts['tstid'][0]:05d}.jpg" if parts["tstid"] else "", "102flowers.tgz")
    items, missing = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    for split, numbers in (("train", parts["trnid"] + parts["valid"]), ("test", parts["tstid"])):
        for n in numbers:
            if not 1 <= n <= len(labels):
                raise FgicError(f"{root / 'setid.mat'}: image {n} is outside 1..{len(labels)} (imagelabels.mat's "
                                f"images); the two files do not belong together")
            fname = f"image_{n:05d}.jpg"
            _collect(items, missing, split, images / fname, labels[n - 1] - 1, fname)
    return Release(f"Oxford Flowers-102 .mat files in {root} (train + val / test)", class_folders(list(FLOWERS)),
                   items, missing, ["class names: the published list (the release numbers the classes only)"])


def read_pets(src: Path) -> Release | None:
    """Oxford-IIIT Pets: annotations/{trainval,test}.txt ('Image CLASS-ID SPECIES BREED-ID', '#' comments) and
    images/Image.jpg. The breed is the image name less its _NUMBER (capitalised: cats, lowercase: dogs)."""
    root = find_dir(src, "trainval.txt") or find_dir(src, "test.txt", called="annotations")
    if root is None:
        return None
    rows, names = {}, {}
    for split, fname in (("train", "trainval.txt"), ("test", "test.txt")):
        path = root / fname
        rows[split] = []
        for n, line in _lines(path):
            if line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit() or "_" not in parts[0]:
                raise FgicError(f"{path} line {n}: expected 'Image CLASS-ID SPECIES BREED-ID', got {line[:60]!r}; is "
                                f"this the official file?")
            cls, breed = int(parts[1]), parts[0].rsplit("_", 1)[0]
            if names.setdefault(cls, breed) != breed:
                raise FgicError(f"{path} line {n}: class {cls} is {names[cls]!r} elsewhere but {breed!r} here; the "
                                f"list files are not the official ones")
            rows[split].append(parts[0])
    order = sorted(names)
    index = {names[c]: i for i, c in enumerate(order)}
    images = _image_dir(src, "images", f"{rows['train'][0]}.jpg" if rows["train"] else "", "images.tar.gz")
    items, missing = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    for split, stems in rows.items():
        for stem in stems:
            _collect(items, missing, split, images / f"{stem}.jpg", index[stem.rsplit("_", 1)[0]], f"{stem}.jpg")
    return Release(f"Oxford-IIIT Pets annotations in {root} (trainval / test)",
                   class_folders([names[c] for c in order]), items, missing)


def read_collated(src: Path) -> Release | None:
    """A folder with train/ and test/ class folders (a collated mirror). Class folders keep their names; numbered
    ones ('1.x', '10.y') are ordered by number with a zero-padded prefix, others keep their sorted order."""
    root = find_dir(src, "train", "test", depth=3)
    if root is None:
        return None
    found = {}
    for split in SPLITS:
        found[split] = images.split_classes(root / split)
    if found["train"] != found["test"]:
        only = sorted(set(found["train"]) ^ set(found["test"]))
        raise FgicError(f"{root}: train/ and test/ have different class folders (e.g. {only[:3]}); "
                        f"both need the same classes")
    names, notes = found["train"], []
    numbered = [re.match(r"^(\d+)[._ -](.+)$", n) for n in names]
    if names and all(numbered):
        order = sorted(range(len(names)), key=lambda i: int(numbered[i].group(1)))
        width = max(3, len(str(max(int(m.group(1)) for m in numbered))))
        folders = [f"{int(numbered[i].group(1)):0{width}d}.{safe_name(numbered[i].group(2))}" for i in order]
        names = [names[i] for i in order]
    else:
        folders = list(names)  # renaming could change their sorted order, hence the class indices
        notes.append("the class folders have no number prefix: kept in their sorted order, which may differ from "
                     "the official class ids")
    if len(set(folders)) != len(folders):
        raise FgicError(f"{root}: class folders {names[:3]}... give clashing names; rename them")
    items = {s: [] for s in SPLITS}
    for split in SPLITS:
        for label, name in enumerate(names):
            top = root / split / name
            for folder, subfolders, files in os.walk(top):
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # as data.class_samples: none hidden
                prefix = os.path.relpath(folder, top).replace(os.sep, "__") + "__" if folder != str(top) else ""
                items[split].extend((Path(folder) / f, label, prefix + f) for f in sorted(files) if images.is_image(f))
    return Release(f"collated train/test class folders in {root}", folders, items, {s: [] for s in SPLITS}, notes)
