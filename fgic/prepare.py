"""`python -m fgic.prepare {cub,aircraft,cars,nabirds,dogs,flowers,pets} SRC [DST]`: turn an official release into
the checked train/test ImageFolder layout that `-d NAME` reads, with links (or copies), atomically, leaving SRC
untouched."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fgic import releases
from fgic.cli import run_cli
from fgic.config import default_data_root
from fgic.errors import FgicError

MARKER = ".fgic-prepared.json"  # written last, inside the folder that is then renamed into place
DATASETS = ("cub", "aircraft", "cars", "nabirds", "dogs", "flowers", "pets")
AIRCRAFT_LEVELS = {"variant": 100, "family": 70, "manufacturer": 30}  # classes per annotation level
AIRCRAFT_SPLITS = {"trainval": 6667, "train": 3334}  # training images per split (the test split has 3,333)
EXAMPLES = """examples:
  python -m fgic.prepare cub ~/downloads/CUB_200_2011.tgz
  python -m fgic.prepare aircraft ~/downloads/fgvc-aircraft-2013b
  python -m fgic.prepare cars ~/downloads/stanford_cars      (devkit .mat files need scipy; CSV mirrors do not)
  python -m fgic.prepare nabirds ~/downloads/nabirds.tar.gz
  python -m fgic.prepare dogs ~/downloads/stanford_dogs      (images.tar and lists.tar extracted there; scipy)
  python -m fgic.prepare flowers ~/downloads/flowers102      (102flowers.tgz extracted there, imagelabels.mat,
                                                              setid.mat; scipy)
  python -m fgic.prepare pets ~/downloads/oxford-iiit-pet    (images.tar.gz and annotations.tar.gz extracted there)"""
# The official sizes: classes, training images, test images (Aircraft's: AIRCRAFT_LEVELS, AIRCRAFT_SPLITS).
SIZES = {"cub": (200, 5994, 5794), "cars": (196, 8144, 8041), "nabirds": (555, 23929, 24633),
         "dogs": (120, 12000, 8580), "flowers": (102, 2040, 6149), "pets": (37, 3680, 3669)}
# What each reader looks for, said when SRC holds none of it.
WANTED = {
    "cub": "the extracted CUB_200_2011 folder (images.txt, classes.txt, ...) or CUB_200_2011.tgz",
    "aircraft": "fgvc-aircraft-2013b (data/variants.txt, data/images/, ...) or fgvc-aircraft-2013b.tar.gz",
    "cars": "the Stanford Cars devkit (cars_meta.mat, cars_train/, cars_test/), cars_annos.mat with car_ims/, or the "
            "CSV mirror (names.csv, anno_train.csv, anno_test.csv)",
    "nabirds": "the extracted nabirds folder (images.txt, classes.txt, images/, ...) or nabirds.tar.gz",
    "dogs": "a folder with Images/ and lists/ (images.tar and lists.tar extracted into it)",
    "flowers": "a folder with jpg/, imagelabels.mat and setid.mat (102flowers.tgz extracted into it)",
    "pets": "a folder with images/ and annotations/ (images.tar.gz and annotations.tar.gz extracted into it)",
}
READERS = {"cub": releases.read_cub, "cars": releases.read_cars, "nabirds": releases.read_nabirds,
           "dogs": releases.read_dogs, "flowers": releases.read_flowers, "pets": releases.read_pets}


@dataclass(frozen=True)
class Expected:
    """The official sizes: classes, training images, test images."""
    classes: int
    train: int
    test: int


def expected_counts(name: str, level: str = "variant", split: str = "trainval") -> Expected:
    """The sizes of the official release (Aircraft: of the annotation level and training split)."""
    if name == "aircraft":
        return Expected(AIRCRAFT_LEVELS[level], AIRCRAFT_SPLITS[split], 3333)
    return Expected(*SIZES[name])


def prepare(name: str, src: str | os.PathLike, dst: str | os.PathLike, *, copy: bool = False,
            allow_partial: bool = False, level: str = "variant", split: str = "trainval",
            expected: Expected | None = None) -> dict:
    """Prepare dataset `name` from `src` into `dst` and return its summary (also kept in DST/.fgic-prepared.json).

    `expected` replaces the official sizes (the tests prepare miniature releases with it). A finished `dst` with the
    same options is left as it is; anything else at `dst` is refused.
    """
    src, dst = Path(src), Path(dst)
    options = {"dataset": name, **({"level": level, "split": split} if name == "aircraft" else {})}
    if not src.exists():
        raise FgicError(f"{src}: no such file or folder; give the extracted release or its archive")
    if src.resolve() in (dst.resolve(), *dst.resolve().parents) or dst.resolve() in src.resolve().parents:
        raise FgicError(f"{dst}: DST and SRC overlap; give a DST outside SRC (SRC is never modified)")
    done = _finished(dst, options)
    if done is not None:
        print(f"fgic.prepare: {dst} is already prepared ({_counts_line(done)}); nothing to do (remove it to "
              f"prepare again)")
        return done
    for stale in sorted(dst.parent.glob(f".{dst.name}.prepare-*")) + sorted(dst.parent.glob(f".{dst.name}.extract-*")):
        print(f"fgic.prepare: notice: {stale} is left from an interrupted prepare; delete it when no prepare runs",
              file=sys.stderr)
    extracted, source = None, src.resolve()

    def named(text: str) -> str:  # messages name the archive, not the temporary folder it was extracted to
        return text.replace(str(extracted), str(source)) if extracted else text

    try:
        mode = "copy" if copy else "link"
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            extracted = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.extract-"))
            _extract(src, extracted)
            src, mode = extracted, "move"  # our own extraction: its files are moved, then the rest deleted
        try:
            release = _read(name, src, level, split)
        except FgicError as exc:
            raise FgicError(named(str(exc))) from None
        summary = _check(name, release, expected or expected_counts(name, level, split), allow_partial, named)
        summary.update(options, source=str(source))
        return _build(release, dst, mode, summary, options)
    finally:
        if extracted is not None:
            shutil.rmtree(extracted, ignore_errors=True)


def _finished(dst: Path, options: dict) -> dict | None:
    """The summary of a finished prepare at dst with these options; None when dst is absent or an empty folder."""
    if not dst.exists():
        return None
    if not dst.is_dir():
        raise FgicError(f"{dst}: exists and is not a folder; remove it or give another DST")
    marker = dst / MARKER
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except (OSError, ValueError):
            raise FgicError(f"{marker}: unreadable; remove {dst} and prepare again") from None
        differ = {k: (done.get(k), v) for k, v in options.items() if done.get(k) != v}
        if not differ:
            return done
        what = ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in differ.items())
        example = f" (e.g. {dst}-{options['level']}-{options['split']}, then -d that folder)" if "level" in options \
            else ""
        raise FgicError(f"{dst}: was prepared with {what}; remove it or give another DST{example}")
    if any(dst.iterdir()):
        raise FgicError(f"{dst}: exists but is not a finished fgic.prepare output (no {MARKER}); remove it or give "
                        f"another DST")
    return None


def _read(name: str, src: Path, level: str, split: str) -> releases.Release:
    release = releases.read_aircraft(src, level, split) if name == "aircraft" else READERS[name](src)
    if release is None:
        release = releases.read_collated(src)
    if release is None:
        raise FgicError(f"{src}: no {name} release found; give {WANTED[name]}, or a folder with train/ and test/ class "
                        f"folders")
    return release


def _check(name: str, release: releases.Release, want: Expected, allow_partial: bool, named) -> dict:
    """Counts against the official sizes; a difference (or a listed image that is absent) is an error naming it,
    unless allow_partial. `named` rewrites the paths said (an archive's temporary extraction as the archive)."""
    problems = []
    for split in releases.SPLITS:
        lost = release.missing.get(split, [])
        if lost:
            problems.append(named(f"{len(lost)} listed {split} image(s) are missing (first: {lost[0]})"))
    got = {"classes": len(release.classes), "train": len(release.items["train"]), "test": len(release.items["test"])}
    for key, value in got.items():
        if value != getattr(want, key):
            problems.append(f"{key} {value:,} (expected {getattr(want, key):,})")
    for split in releases.SPLITS:
        empty = len(release.classes) - len({label for _, label, _ in release.items[split]})
        if empty:
            problems.append(f"{empty} class(es) without {split} images")
    if problems and not allow_partial:
        raise FgicError(f"{name} from {named(release.origin)}: {'; '.join(problems)}; give the complete release, or "
                        f"pass --allow-partial to prepare what is there")
    for problem in problems:
        print(f"fgic.prepare: warning: {problem} (--allow-partial)", file=sys.stderr)
    return {**got, "origin": named(release.origin), "notes": release.notes, "partial": problems}


def _build(release: releases.Release, dst: Path, mode: str, summary: dict, options: dict) -> dict:
    """Place the files in a temporary sibling of dst, write the marker last, then rename the folder into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.prepare-"))
    try:
        how = {"hard link": 0, "symlink": 0, "copy": 0, "move": 0}
        total = sum(len(v) for v in release.items.values())
        with tqdm(total=total, unit="img", desc=f"fgic.prepare {options['dataset']}", disable=None) as bar:
            made, placed = set(), set()  # work/ is new: only this loop puts folders and files in it
            for split, items in release.items.items():
                for path, label, fname in items:
                    target = work / split / release.classes[label] / fname
                    if target.parent not in made:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        made.add(target.parent)
                    if target in placed:
                        raise FgicError(f"{path}: listed twice in {split} (as {target.relative_to(work)}); "
                                        f"the list files are not the official ones")
                    how[place(path, target, mode)] += 1
                    placed.add(target)
                    bar.update()
        summary["files"] = {k: v for k, v in how.items() if v}
        (work / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
        try:
            os.rename(work, dst)
        except OSError:
            other = _finished(dst, options)
            if other is None:  # something else appeared at dst meanwhile
                raise FgicError(f"{dst}: appeared while preparing and is not a finished prepare; remove it and "
                                f"run again") from None
            print(f"fgic.prepare: {dst} was prepared by another run meanwhile; keeping it")
            return other
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    _report(dst, summary)
    return summary


def place(src: Path, dst: Path, mode: str) -> str:
    """Put src at dst: a hard link when possible, else a symlink, else a copy ("link"); or a copy or a move."""
    if mode == "move":
        os.replace(src, dst)
        return "move"
    if mode == "link":
        try:
            os.link(src, dst)
            return "hard link"
        except OSError:
            try:
                os.symlink(os.path.realpath(src), dst)
                return "symlink"
            except OSError:
                pass
    shutil.copy2(src, dst)
    return "copy"


def _extract(archive: Path, into: Path) -> None:
    """Unpack a .tgz/.tar(.gz|.bz2|.xz) or .zip; members that would land outside `into` are refused."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)  # zipfile drops absolute paths and '..' itself
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r|*") as t:  # one pass over the stream: 3x faster than seeking in a .tgz
                if hasattr(tarfile, "data_filter"):
                    t.extractall(into, filter="data")
                else:  # Python < 3.10.12: plain files and folders with relative, inward paths only
                    for m in t:
                        if (m.isfile() or m.isdir()) and not m.name.startswith("/") and ".." not in Path(m.name).parts:
                            t.extract(m, into)
        else:
            raise FgicError(f"{archive}: not a folder, tar or zip archive; give the extracted release or its .tgz")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise FgicError(f"{archive}: could not be extracted ({type(exc).__name__}: {str(exc)[:80]}); re-download "
                        f"it or extract it yourself and give the folder") from None


def _counts_line(s: dict) -> str:
    return f"{s.get('classes', '?')} classes, {s.get('train', 0):,} train / {s.get('test', 0):,} test images"


def _report(dst: Path, s: dict) -> None:
    plural = {"hard link": "hard links", "symlink": "symlinks", "copy": "copies", "move": "moved files"}
    files = ", ".join(f"{n:,} {k if n == 1 else plural[k]}" for k, n in s["files"].items())
    print(f"fgic.prepare: {s['dataset']} from {s['origin']}")
    print(f"  {_counts_line(s)}{' (partial)' if s['partial'] else ''}")
    print(f"  {files} in {dst}")
    if "symlink" in s["files"]:
        print("  note: symlinks point into SRC, so keep SRC where it is")
    for note in s["notes"]:
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("fgic.prepare", description="Turn an official CUB-200-2011, FGVC-Aircraft, Stanford "
                                "Cars, NABirds, Stanford Dogs, Oxford Flowers-102 or Oxford-IIIT Pets release into the "
                                "checked train/test layout that `-d NAME` reads.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("src", help="the extracted release (or its .tgz/.tar.gz/.zip), or collated train/ test/ folders")
    p.add_argument("dst", nargs="?", help="where to write (default: DATA_ROOT/DATASET, the folder -d DATASET reads)")
    p.add_argument("--data-root", default=default_data_root(),
                   help="the default DST's parent (default: $FGIC_DATA or ./data)")
    p.add_argument("--copy", action="store_true", help="copy the images instead of hard-linking them")
    p.add_argument("--allow-partial", action="store_true", help="prepare even if counts differ from the official ones")
    p.add_argument("--aircraft-split", choices=tuple(AIRCRAFT_SPLITS),
                   help="Aircraft training split: trainval (default) or train (the validation images left out)")
    p.add_argument("--aircraft-level", choices=tuple(AIRCRAFT_LEVELS), help="Aircraft classes (default variant)")
    args = p.parse_args(argv)
    if args.dataset != "aircraft" and (args.aircraft_split or args.aircraft_level):
        raise FgicError(f"--aircraft-split/--aircraft-level apply to aircraft only, not {args.dataset}")
    dst = Path(args.dst) if args.dst else Path(args.data_root) / args.dataset
    prepare(args.dataset, args.src, dst, copy=args.copy, allow_partial=args.allow_partial,
            level=args.aircraft_level or "variant", split=args.aircraft_split or "trainval")
    hint = str(dst) if args.dst else args.dataset
    if not args.dst and args.data_root != default_data_root():
        hint += f" --data-root {args.data_root}"
    print(f"  train with: python -m fgic.ddp -d {hint}")
    return 0


def cli() -> None:
    run_cli(main, "fgic.prepare")


if __name__ == "__main__":
    cli()
