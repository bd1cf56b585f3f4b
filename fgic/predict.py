"""Classify images with a trained run: `python -m fgic.predict RUN_DIR|CHECKPOINT IMAGES...`, the top-k classes of
each image with their probabilities, printed and written to OUTPUT.csv and OUTPUT.json (by default
RUN_DIR/predictions/NAME, NAME that of the folder or file given; an existing file is replaced only with --force).
Images are read and transformed as the run's test split is (fgic.data); an image whose parent folder is named after a
class counts towards the accuracy printed at the end, so on the test split it gives `--eval-only`'s top-1."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fgic import augment, engine, images, trained
from fgic.cli import run_cli
from fgic.data import usable_cpus
from fgic.dist import pick_device
from fgic.errors import FgicError
from fgic.models import logits


def list_images(paths: list[str]) -> list[Path]:
    """The files named, and the image files below the folders named (sorted), in the order given."""
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and images.is_image(p.name)
                            and not any(part.startswith(".") for part in p.relative_to(path).parts[:-1]))
        elif path.is_file():
            found.append(path)
        else:
            raise FgicError(f"IMAGES {name}: no such file or folder")
    if not found:
        raise FgicError(f"IMAGES {' '.join(paths)}: no image files ({', '.join(images.IMG_EXTENSIONS)})")
    return found


def read(path: Path, resize: int, crop: int) -> torch.Tensor | str:
    """The test crop of an image as uint8 CHW, or why it could not be read."""
    try:
        return augment.center_crop(augment.resize(images.load_rgb(str(path)), resize), crop)
    except Exception as exc:  # PIL raises many types for broken files
        return f"{type(exc).__name__}: {(str(exc).splitlines() or ['unreadable'])[0][:120]}"


def batches(paths: list[Path], resize: int, crop: int, batch_size: int, workers: int):
    """(paths, crops or reasons) per batch, the next batch decoded by the threads while the current one runs."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = None
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            futures = [pool.submit(read, p, resize, crop) for p in chunk]
            if pending is not None:
                yield pending[0], [f.result() for f in pending[1]]
            pending = chunk, futures
        if pending is not None:
            yield pending[0], [f.result() for f in pending[1]]


@torch.inference_mode()
def predict(model, norm: augment.Normalization, loaded, device: torch.device, amp: str, k: int):
    """(path, [(class index, probability)] * k) for each readable image, and (path, why) for the others; `norm`: the
    run's input normalisation."""
    results, bad = [], []
    for paths, crops in loaded:
        bad += [(p, c) for p, c in zip(paths, crops) if isinstance(c, str)]
        good = [(p, c) for p, c in zip(paths, crops) if not isinstance(c, str)]
        if not good:
            continue
        x = trained.to_input([c for _, c in good], norm).to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with engine.autocast(device, amp):
            probs = logits(model(x)).float().softmax(1)
        top = probs.topk(k, dim=1)
        for (p, _), idx, val in zip(good, top.indices.tolist(), top.values.tolist()):
            results.append((p, list(zip(idx, val))))
    return results, bad


def outputs(output: Path) -> tuple[Path, Path]:
    """-o OUTPUT -> OUTPUT.csv, OUTPUT.json (a given .csv or .json suffix is the base's own)."""
    base = output.with_suffix("") if output.suffix in (".csv", ".json") else output
    return Path(f"{base}.csv"), Path(f"{base}.json")


def default_output(source: str, names: list[str]) -> Path:
    """RUN_DIR/predictions/NAME: NAME that of the one folder or file given (`.` included), else `images`."""
    given = Path(names[0]).resolve()
    name = (given.stem if given.is_file() else given.name) if len(names) == 1 else ""
    weights, _ = trained.resolve(source)
    return weights.parent / "predictions" / (name or "images")


def check_free(output: Path, force: bool) -> list[Path]:
    """The output files that exist (to be replaced: --force), or a refusal before any image is read."""
    taken = [f for f in outputs(output) if f.exists()]
    if taken and not force:
        raise FgicError(f"-o/--output {taken[0]}: exists (an earlier fgic.predict's?); give another -o OUTPUT, or "
                        f"--force to replace it")
    return taken


def write(output: Path, run: trained.Trained, results, bad, k: int, accuracy: dict | None) -> None:
    rows = [{"path": str(p), "label": p.parent.name if p.parent.name in run.classes else None,
             "top": [{"class": run.classes[i], "prob": v} for i, v in top]} for p, top in results]
    csv_path, json_path = outputs(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", *[c for j in range(1, k + 1) for c in (f"class_{j}", f"prob_{j}")]])
            for r in rows:
                top = [x for t in r["top"] for x in (t["class"], f"{t['prob']:.6f}")]
                w.writerow([r["path"], r["label"] or "", *top])
        json_path.write_text(json.dumps(
            {"model": run.weights, "topk": k, "accuracy": accuracy, "predictions": rows,
             "skipped": [{"path": str(p), "why": why} for p, why in bad]}, indent=2) + "\n")
    except OSError as exc:
        raise FgicError(f"-o/--output {output}: cannot write ({exc.strerror or exc})") from None


def score(run: trained.Trained, results) -> dict | None:
    """Top-1 over the images whose parent folder is named after a class, or None when there are none."""
    labelled = [(p.parent.name, top[0][0]) for p, top in results if p.parent.name in run.classes]
    if not labelled:
        return None
    correct = sum(run.classes[i] == label for label, i in labelled)
    return {"acc": 100.0 * correct / len(labelled), "correct": correct, "total": len(labelled)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("fgic.predict", description="Classify images with a trained fgic run.")
    p.add_argument("source", metavar=trained.SOURCE, help="a run folder (its checkpoint.pt), or a checkpoint.pt, "
                                                          "best.pt or best_ema.pt inside one")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files, or folders searched recursively")
    p.add_argument("-k", "--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction,
                   help="the checkpoint's EMA weights (default: where it has them)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    p.add_argument("-a", "--amp", choices=tuple(engine.AMP_DTYPES) + ("off",),
                   help="mixed precision (default: the run's on a GPU, off on the CPU)")
    p.add_argument("-w", "--workers", type=int, help="threads reading images (default: the CPUs, at most 8)")
    p.add_argument("-o", "--output", type=Path,
                   help="writes OUTPUT.csv and OUTPUT.json (default RUN_DIR/predictions/NAME, NAME that of the one "
                        "folder or file given, else images)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT.csv and OUTPUT.json when they exist")
    p.add_argument("-q", "--quiet", action="store_true", help="print the summary only, not a line per image")
    args = p.parse_args(argv)
    for flag, value in (("-k/--topk", args.topk), ("-b/--batch-size", args.batch_size),
                        ("-w/--workers", 1 if args.workers is None else args.workers)):
        if value < 1:
            raise FgicError(f"{flag} {value}: must be at least 1")
    paths = list_images(args.images)
    output = args.output or default_output(args.source, args.images)
    replaced = check_free(output, args.force)
    device = pick_device(args.device, [], 0)
    run = trained.load(args.source, args.ema)
    k = min(args.topk, len(run.classes))
    amp = args.amp or (run.config.get("amp", "off") if device.type == "cuda" else "off")
    if device.type == "cuda":
        engine.check_amp(amp, device)
    model = run.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    workers = args.workers or min(8, usable_cpus())
    loaded = batches(paths, run.resize, run.crop, args.batch_size, workers)
    results, bad = predict(model, run.normalization, loaded, device, amp, k)
    for path, why in bad:
        print(f"fgic.predict: skipped {path}: {why}", file=sys.stderr)
    if not results:
        raise FgicError(f"IMAGES: none of the {len(paths)} file(s) could be read as an image (see the lines above)")
    if not args.quiet:
        for path, top in results:
            print(f"{path}: " + ", ".join(f"{run.classes[i]} {v:.3f}" for i, v in top))
    accuracy = score(run, results)
    write(output, run, results, bad, k, accuracy)
    acc = (f"; top-1 {accuracy['acc']:.2f}% ({accuracy['correct']}/{accuracy['total']}) on the images in a folder "
           f"named after their class" if accuracy else "")
    print(f"fgic.predict: {len(results)} image(s) classified with {run.weights} on {device.type}, {len(bad)} "
          f"skipped{acc} -> {' and '.join(map(str, outputs(output)))}"
          f"{' (replaced: ' + ', '.join(map(str, replaced)) + ')' if replaced else ''}")
    return 0


def cli() -> None:
    run_cli(main, "fgic.predict")


if __name__ == "__main__":
    cli()
