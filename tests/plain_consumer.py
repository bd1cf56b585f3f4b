"""What someone without fgic writes to run an fgic.export file: PIL, numpy and torch (onnxruntime for .onnx), the
preprocessing read from FILE.json. fgic is made unimportable first, so a hidden dependency on it fails here.

    python tests/plain_consumer.py MODEL.pt2|MODEL.onnx OUT.npy IMAGE...   (OUT.npy: the logits, one row per image)
"""
import importlib.abc
import json
import sys


class NoFgic(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fgic" or name.startswith("fgic."):
            raise ImportError(f"{name}: an exported model must run without fgic")
        return None


sys.meta_path.insert(0, NoFgic())

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402


def preprocess(path: str, pre: dict) -> np.ndarray:
    """preprocessing["steps"], one line each."""
    image = Image.open(path)
    image = ImageOps.exif_transpose(image) if pre["exif_transpose"] else image
    if image.mode in pre["high_bit_modes"]:
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> pre["high_bit_shift"]).clip(0, 255)
                                .astype(np.uint8), "L")
    image = image.convert("RGB")
    image = image.resize(tuple(pre["resize"]), Image.BILINEAR)
    top, (size, _) = pre["crop_offset"], pre["crop"]
    image = image.crop((top, top, top + size, top + size))
    x = np.asarray(image, dtype=np.float32) * pre["scale"]
    x = (x - np.array(pre["mean"], dtype=np.float32)) / np.array(pre["std"], dtype=np.float32)
    return x.transpose(2, 0, 1)


def main(model_path: str, out: str, images: list[str]) -> None:
    meta = json.load(open(f"{model_path}.json"))
    batch = np.stack([preprocess(p, meta["preprocessing"]) for p in images]).astype(np.float32)
    if model_path.endswith(".onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        logits = session.run(None, {meta["input"]: batch})[0]
    else:
        import torch

        extra = {"fgic.json": ""}
        program = torch.export.load(model_path, extra_files=extra)
        assert json.loads(extra["fgic.json"])["classes"] == meta["classes"]
        with torch.no_grad():
            logits = program.module()(torch.from_numpy(batch)).numpy()
    np.save(out, logits)
    top = logits.argmax(1)
    print("\n".join(f"{p}: {meta['classes'][i]}" for p, i in zip(images, top)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
