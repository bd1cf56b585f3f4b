"""A trained run as a file that runs without fgic: `python -m fgic.export RUN_DIR --format pt2|onnx` writes a
torch.export ExportedProgram (torch.export.load(...).module()) or an ONNX model, its input a float NCHW batch of any
size, and beside it FILE.json with the class names and every step from an image file to the input (preprocessing:
steps, and their numbers; also inside the file: the pt2's extra file fgic.json, the ONNX model's metadata entry
fgic). The export is checked against the model it came from."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from fgic import trained
from fgic.cli import run_cli
from fgic.errors import FgicError

FORMATS = ("pt2", "onnx")
MAX_BATCH = 4096  # the batch dimension's upper bound in the exported graph
CHECK_BATCH = 2  # inputs the export is compared on (a batch of 1 would let the exporter specialise the dimension)
# Largest |logit difference| accepted between the export and the model: measured 0 (pt2) and at most 1.5e-6 (ONNX
# Runtime) on resnet18, vit_b_32, swin_t and convnext_tiny at 64 px; a wrong graph is off by whole units.
TOLERANCE = 1e-3
ONNX_ONE_FILE = 2**31 - 2**20  # protobuf's 2 GiB limit: a larger model keeps its weights in FILE.data


# fgic.images.load_rgb's decode, for code without fgic: a phone photo (EXIF Orientation 6) read without the
# rotation gave logits 0.22 away from fgic.predict's; a 16-bit PNG converted by PIL alone is clipped at 255.
DECODE = {"exif_transpose": True, "high_bit_modes": ["I;16", "I;16B", "I;16L", "I"], "high_bit_shift": 8}
STEPS = [
    "open the file with PIL (Image.open)",
    "exif_transpose: rotate/flip by the EXIF Orientation tag (PIL.ImageOps.exif_transpose)",
    "an image of a PIL mode in high_bit_modes (16-bit grayscale): value >> high_bit_shift, clipped to 0..255, as "
    "8-bit grayscale (mode L)",
    "PIL Image.convert('RGB')",
    "resize to resize (width, height) with PIL's bilinear filter (Image.resize(size, Image.BILINEAR))",
    "crop crop (width, height) at (crop_offset, crop_offset) from the top left (a negative offset: the image inside "
    "the crop, zeros around it, as PIL's Image.crop gives)",
    "x * scale, then (x - mean) / std per RGB channel, as float32",
    "HWC -> CHW; a batch is NCHW",
]


def description(run: trained.Trained, fmt: str) -> dict:
    return {"format": fmt, "arch": run.config["arch"], "weights": run.weights, "num_classes": len(run.classes),
            "classes": run.classes, "input": "images", "output": "logits (softmax gives the probabilities)",
            "preprocessing": {"steps": STEPS, **DECODE, **run.preprocessing()}}


def export_pt2(model, example: torch.Tensor, path: Path, meta: dict):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path, extra_files={"fgic.json": json.dumps(meta)})
    return lambda x: torch.export.load(path).module()(x).detach()


def export_onnx(model, example: torch.Tensor, path: Path, meta: dict):
    try:
        import onnx  # noqa: PLC0415  (onnx, onnxscript: the optional 'onnx' extra)
        import onnxscript  # noqa: F401, PLC0415
    except ImportError:
        raise FgicError("--format onnx: needs onnx and onnxscript (pip install onnx onnxscript onnxruntime); or use "
                        "--format pt2") from None
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},))
    graph = onnx.load(str(path))  # the exporter keeps the weights in FILE.data; one file is easier to hand over
    graph.metadata_props.add(key="fgic", value=json.dumps(meta))
    data = Path(f"{path}.data")
    if graph.ByteSize() < ONNX_ONE_FILE:
        onnx.save(graph, str(path))
        data.unlink(missing_ok=True)
    else:
        onnx.save(graph, str(path), save_as_external_data=True, location=data.name)
    try:
        import onnxruntime  # noqa: PLC0415  (optional: the check below)
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("fgic.export", description="Export a trained fgic run for use without fgic.")
    p.add_argument("source", metavar=trained.SOURCE, help="a run folder (its checkpoint.pt), or a checkpoint.pt, "
                                                          "best.pt or best_ema.pt inside one")
    p.add_argument("--format", choices=FORMATS, default="pt2", help="pt2: torch.export (default); onnx: ONNX")
    p.add_argument("-o", "--output", type=Path, help="the file (default RUN_DIR/export/model.FORMAT)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction,
                   help="the checkpoint's EMA weights (default: where it has them)")
    p.add_argument("--force", action="store_true", help="replace the file (and its .json) when it exists")
    args = p.parse_args(argv)
    weights, _ = trained.resolve(args.source)
    path = args.output or weights.parent / "export" / f"model.{args.format}"
    taken = next((f for f in (path, Path(f"{path}.json")) if f.exists()), None)
    if taken and not args.force:  # an earlier export, perhaps of other weights (best.pt, --no-ema), kept
        raise FgicError(f"-o/--output {taken}: exists (an earlier fgic.export's?); give another -o OUTPUT, or --force "
                        f"to replace it")
    run = trained.load(args.source, args.ema)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FgicError(f"-o/--output {path}: cannot create its folder ({exc.strerror or exc})") from None
    meta = description(run, args.format)
    example = torch.randn(CHECK_BATCH, 3, run.crop, run.crop, generator=torch.Generator().manual_seed(0))
    exporter = export_pt2 if args.format == "pt2" else export_onnx
    try:
        reload = exporter(run.model, example, path, meta)
    except OSError as exc:
        raise FgicError(f"-o/--output {path}: cannot write ({exc.strerror or exc})") from None
    except FgicError:
        raise
    except Exception as exc:  # the exporters fail in many types on a graph they cannot capture
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        other = "onnx" if args.format == "pt2" else "pt2"
        raise FgicError(f"--format {args.format}: torch could not export {run.config['arch']} ({why}); try --format "
                        f"{other}, or fgic.predict on this machine") from None
    sidecar = Path(f"{path}.json")
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    checked = "not checked (pip install onnxruntime to check it)"
    if reload is not None:
        with torch.inference_mode():
            diff = (reload(example) - run.model(example)).abs().max().item()
        if not diff <= TOLERANCE:
            print(f"fgic.export: error: {path}'s logits differ from the model's by {diff:.3g} (more than "
                  f"{TOLERANCE:g}); please report it with the arch ({run.config['arch']}) and torch version",
                  file=sys.stderr)
            return 1
        checked = f"checked: its logits are the model's within {diff:.2g}"
    print(f"fgic.export: {run.weights} ({run.config['arch']}, {len(run.classes)} classes, {run.crop}x{run.crop}) -> "
          f"{path}, with {sidecar}; {checked}")
    return 0


def cli() -> None:
    run_cli(main, "fgic.export")


if __name__ == "__main__":
    cli()
