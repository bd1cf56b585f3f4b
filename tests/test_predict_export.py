"""After training: `fgic.predict` gives `--eval-only`'s accuracy and confusions on the test split and skips bad
images; `fgic.export` files run without fgic (tests/plain_consumer.py) with the checkpoint's logits; the eval
pictures and tables."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fgic import export, models, predict, trained
from fgic.errors import FgicError
from tests.helpers import REPO, fgic_env, optional, run_fgic, tiny_args

NAME = "resnet18-off-s2020"
EMA = ["--model-ema", "--model-ema-steps", "1"]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> Path:
    """A tiny 2-epoch run with an EMA of the weights."""
    out = tmp_path_factory.mktemp("runs")
    res = run_fgic(["-d", str(tiny_data), *tiny_args(), *EMA, "--output-dir", str(out)])
    assert res.returncode == 0, res.stderr
    return out / "tiny" / NAME


def fake_run(folder: Path, arch: str, crop: int, classes=("a", "b", "c")) -> Path:
    """A run folder without training: config.json and best.pt of a freshly built model."""
    folder.mkdir(parents=True)
    model = models.build(arch, len(classes), "none", crop=crop)
    torch.save(model.state_dict(), folder / "best.pt")
    (folder / "config.json").write_text(json.dumps({"arch": arch, "resize": crop + 8, "crop": crop,
                                                    "classes": list(classes), "num_classes": len(classes)}))
    return folder


def predict_cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fgic.predict", *map(str, args)], cwd=cwd, env=fgic_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
@pytest.mark.parametrize("ema", [True, False])
def test_predict_on_the_test_split_gives_eval_onlys_accuracy_and_confusions(tiny_data, run, tmp_path, ema):
    res = run_fgic(["-d", str(tiny_data), *tiny_args(), *(EMA if ema else []), "--eval-only", "--resume",
                    str(run / "checkpoint.pt"), "--output-dir", str(tmp_path / "eval")], nproc=2)
    assert res.returncode == 0, res.stderr
    ev = json.loads((tmp_path / "eval" / "tiny" / NAME / "eval.json").read_text())
    res = predict_cli(run, tiny_data / "test", "--ema" if ema else "--no-ema", "-q", "-o", tmp_path / "pred")
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "pred.json").read_text())
    assert (out["accuracy"]["correct"], out["accuracy"]["total"]) == (ev["correct"], ev["total"]) and ev["total"] == 101
    assert out["accuracy"]["acc"] == pytest.approx(ev["acc"])
    assert out["model"].endswith("(EMA)") == ema
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ev["correct"] == records[-1]["ema_test_correct" if ema else "test_correct"]
    # the same mistakes, image by image: predict's (label, top-1) pairs are eval.json's confusion counts
    mistakes = Counter((p["label"], p["top"][0]["class"]) for p in out["predictions"]
                       if p["label"] != p["top"][0]["class"])
    assert mistakes == Counter({(c["true"], c["predicted"]): c["count"] for c in ev["confusions"]})
    assert sum(mistakes.values()) == ev["total"] - ev["correct"]
    assert sum(ev["per_class_total"].values()) == 101
    for p in out["predictions"]:
        assert len(p["top"]) == 3 and sum(t["prob"] for t in p["top"]) == pytest.approx(1, abs=1e-5)


@pytest.mark.e2e
def test_predict_lists_and_skips_bad_images(run, tiny_data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_data / "test" / "class_01", images / "class_01")
    (images / "class_01" / "broken.jpg").write_bytes(b"not a jpeg")
    (images / "notes.png").write_text("hello")
    (images / "README.txt").write_text("not an image name: not listed")
    single = sorted((tiny_data / "test" / "class_00").iterdir())[0]
    res = predict_cli(run, images, single, "-k", "2", "-o", tmp_path / "out.csv")
    assert res.returncode == 0, res.stderr
    skipped = [line for line in res.stderr.splitlines() if line.startswith("fgic.predict: skipped ")]
    assert len(skipped) == 2 and "broken.jpg" in skipped[0] and "notes.png" in skipped[1], res.stderr
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert rows[0] == "path,label,class_1,prob_1,class_2,prob_2" and len(rows) == 1 + 34 + 1
    out = json.loads((tmp_path / "out.json").read_text())
    assert [s["path"] for s in out["skipped"]] == [str(images / "class_01" / "broken.jpg"), str(images / "notes.png")]
    assert out["accuracy"]["total"] == 35  # 34 in class_01/, the single image in class_00/
    printed = [line for line in res.stdout.splitlines() if line.startswith(str(single))]
    assert len(printed) == 1 and printed[0].count(" 0.") + printed[0].count(" 1.0") == 2
    assert "35 image(s) classified" in res.stdout and "2 skipped" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere", "{img}"], "RUN_DIR|CHECKPOINT {tmp}/nowhere: no such file or folder"),
    (["{tmp}", "{img}"], "RUN_DIR|CHECKPOINT {tmp}: no config.json"),
    (["{run}/best.pt", "{img}", "--ema"], "--ema: {run}/best.pt holds no EMA weights"),
    (["{run}", "{tmp}/missing.jpg"], "IMAGES {tmp}/missing.jpg: no such file or folder"),
    (["{run}", "{img}", "-k", "0"], "-k/--topk 0: must be at least 1"),
])
def test_predict_bad_input_is_one_line(tmp_path, args, message):
    run = fake_run(tmp_path / "run", "resnet18", 32)
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    fill = {"tmp": tmp_path, "run": run, "img": img}
    with pytest.raises(FgicError) as exc:
        predict.main([a.format(**fill) for a in args])
    assert message.format(**fill) in str(exc.value) and "\n" not in str(exc.value)


def test_predict_writes_beside_the_run_and_replaces_nothing_unasked(tmp_path, tiny_data, monkeypatch, capsys):
    run = fake_run(tmp_path / "run", "resnet18", 32)
    images = tiny_data / "test" / "class_01"
    monkeypatch.chdir(tmp_path)
    assert predict.main([str(run / "best.pt"), str(images), "-q"]) == 0
    csv, js = run / "predictions" / "class_01.csv", run / "predictions" / "class_01.json"
    assert f"-> {csv} and {js}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing in the current folder
    first = js.read_text()
    js.write_text("kept")
    with pytest.raises(FgicError) as exc:
        predict.main([str(run / "best.pt"), str(images), "-q"])
    assert str(exc.value) == (f"-o/--output {csv}: exists (an earlier fgic.predict's?); give another -o OUTPUT, or "
                              f"--force to replace it")
    assert js.read_text() == "kept"
    assert predict.main([str(run / "best.pt"), str(images), "-q", "--force"]) == 0
    assert f"(replaced: {csv}, {js})" in capsys.readouterr().out and js.read_text() == first
    assert predict.main([str(run / "best.pt"), str(images / ".." / "class_00"), str(images), "-q"]) == 0
    assert (run / "predictions" / "images.json").is_file()


def test_a_run_without_class_names_reads_them_from_its_dataset(tmp_path, tiny_data):
    run = fake_run(tmp_path / "run", "resnet18", 32)
    config = json.loads((run / "config.json").read_text())
    del config["classes"]
    (run / "config.json").write_text(json.dumps({**config, "data_path": str(tiny_data)}))
    assert trained.load(str(run / "best.pt")).classes == ["class_00", "class_01", "class_02"]
    (run / "config.json").write_text(json.dumps({**config, "data_path": str(tmp_path / "gone")}))
    with pytest.raises(FgicError, match="names no classes and the dataset's train/"):
        trained.load(str(run / "best.pt"))


def reference_logits(source: str, images: list[Path]) -> np.ndarray:
    """The logits fgic's own model and test transform give (fgic.predict's path)."""
    run = trained.load(source)
    crops = [predict.read(p, run.resize, run.crop) for p in images]
    with torch.inference_mode():
        return run.model(trained.to_input(crops, run.normalization)).numpy()


def consume(path: Path, images: list[Path], tmp_path: Path) -> np.ndarray:
    out = tmp_path / "logits.npy"
    res = subprocess.run([sys.executable, str(REPO / "tests" / "plain_consumer.py"), str(path), str(out),
                          *map(str, images)], cwd=tmp_path, env={**fgic_env(), "PYTHONPATH": ""},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == len(images)
    return np.load(out)


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", export.FORMATS)
def test_an_export_runs_without_fgic_with_the_checkpoints_logits(run, tiny_data, tmp_path, fmt):
    if fmt == "onnx":
        optional("onnxruntime")
    images = sorted((tiny_data / "test").rglob("*.jpg"))[::10]  # 11 real images of the 3 classes
    res = subprocess.run([sys.executable, "-m", "fgic.export", str(run), "--format", fmt], cwd=REPO, env=fgic_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    path = run / "export" / f"model.{fmt}"
    assert "checked: its logits are the model's within" in res.stdout and str(path) in res.stdout
    meta = json.loads(Path(f"{path}.json").read_text())
    assert meta["classes"] == ["class_00", "class_01", "class_02"] and meta["weights"].endswith("(EMA)")
    assert meta["preprocessing"]["resize"] == [72, 72] and meta["preprocessing"]["crop_offset"] == 4
    got, want = consume(path, images, tmp_path), reference_logits(str(run), images)
    print(f"{fmt}: max |logit difference| from the checkpoint's, fgic's transform vs a plain one: "
          f"{np.abs(got - want).max():.3g}")
    assert got.shape == (len(images), 3) and np.abs(got - want).max() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


def awkward_images(tiny_data: Path, folder: Path) -> list[Path]:
    """A phone photo's JPEG (EXIF Orientation 6: stored sideways, shown rotated) and a 16-bit grayscale PNG, made of
    a test image stretched to 96x64 (the rotation then changes the picture)."""
    from PIL import Image
    folder.mkdir()
    source = Image.open(sorted((tiny_data / "test").rglob("*.jpg"))[0]).convert("RGB").resize((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    source.save(folder / "phone.jpg", exif=exif, quality=95)
    gray = np.asarray(source.convert("L"), dtype=np.uint16) * 257  # the full 16-bit range
    Image.fromarray(gray).save(folder / "scan16.png")
    assert Image.open(folder / "scan16.png").mode == "I;16"
    return [folder / "phone.jpg", folder / "scan16.png"]


@pytest.mark.e2e
@pytest.mark.parametrize("resize, crop", [(72, 64), (37, 32), (33, 32), (32, 36), (32, 35)])
def test_the_exports_crop_offset_is_torchvisions_center_crop(resize, crop):
    """The test crop as fgic takes it (torchvision's center_crop: a crop larger than the image, as far as --padding
    allows, pads it with zeros) against PIL's Image.crop at the exported offset."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F
    image = torch.randint(1, 256, (3, resize, resize), dtype=torch.uint8)
    offset = trained.Trained(None, [], {"resize": resize, "crop": crop}, "").crop_offset
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).crop((offset, offset, offset + crop, offset + crop))
    assert torch.equal(torch.from_numpy(np.array(pil)).permute(2, 0, 1), F.center_crop(image, [crop, crop]))


@pytest.mark.e2e  # in-process, but torch.export takes seconds (the quick loop stays under a minute)
def test_the_exports_description_names_every_decode_step(tmp_path, tiny_data):
    """Read by its steps alone (tests/plain_consumer.py), an EXIF-rotated JPEG and a 16-bit PNG give fgic.predict's
    logits: the rotation and the bit depth are part of the description."""
    run = fake_run(tmp_path / "run", "resnet18", 64)
    assert export.main([str(run / "best.pt"), "-o", str(tmp_path / "m.pt2")]) == 0
    images = awkward_images(tiny_data, tmp_path / "images")
    got, want = consume(tmp_path / "m.pt2", images, tmp_path), reference_logits(str(run / "best.pt"), images)
    print(f"EXIF JPEG, 16-bit PNG: max |logit difference| {np.abs(got - want).max(1)}")
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.e2e
@pytest.mark.parametrize("arch, crop", [("vit_b_32", 64), ("swin_t", 64), ("timm:test_vit", 64)])
def test_other_archs_export_to_pt2_with_a_dynamic_batch(arch, crop, tmp_path, tiny_data, capsys):
    if arch.startswith("timm:"):
        optional("timm")
    run = fake_run(tmp_path / "run", arch, crop)
    assert export.main([str(run / "best.pt"), "-o", str(tmp_path / "m.pt2")]) == 0
    assert "checked: its logits are the model's within" in capsys.readouterr().out
    images = sorted((tiny_data / "test").rglob("*.jpg"))[:5]
    got, want = consume(tmp_path / "m.pt2", images, tmp_path), reference_logits(str(run / "best.pt"), images)
    assert np.abs(got - want).max() < 1e-4


def test_export_onnx_without_the_extra_is_one_line(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run", "resnet18", 32)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(FgicError, match=r"--format onnx: needs onnx and onnxscript \(pip install onnx onnxscript"):
        export.main([str(run / "best.pt"), "--format", "onnx"])


def test_a_best_ema_file_with_truncated_indices_is_loaded_with_the_models_own(tmp_path):
    """best_ema.pt of a Swin written before the EMA copied its integer buffers: loaded with the built model's, by
    predict and export (fgic.trained) and by --weights (fgic.ddp --eval-only --weights best_ema.pt, a fine-tune)."""
    run = fake_run(tmp_path / "run", "swin_t", 224)
    state = torch.load(run / "best.pt", weights_only=True)
    index = "features.1.0.attn.relative_position_index"
    torch.save({**state, index: state[index] - (state[index] % 7 == 5).long()}, run / "best_ema.pt")
    for loaded in (trained.load(str(run / "best_ema.pt")).model.state_dict(),
                   models.build("swin_t", 3, str(run / "best_ema.pt"), crop=224, new_head=False).state_dict()):
        assert torch.equal(loaded[index], state[index]) and torch.equal(loaded["head.weight"], state["head.weight"])


def test_best_ema_is_the_emas_weights_whatever_ema_says(tmp_path):
    """best_ema.pt holds the EMA's weights alone: --ema takes them, --no-ema (the plain weights) is refused in one
    line rather than quietly given the EMA's."""
    run = fake_run(tmp_path / "run", "resnet18", 32)
    shutil.copy(run / "best.pt", run / "best_ema.pt")
    assert trained.load(str(run / "best_ema.pt"), ema=True).weights == str(run / "best_ema.pt")
    with pytest.raises(FgicError, match=re.escape(f"--no-ema: {run / 'best_ema.pt'} holds the EMA's weights only; "
                                                  f"give {run / 'best.pt'} or the run folder for the plain ones")):
        trained.load(str(run / "best_ema.pt"), ema=False)


def test_an_earlier_export_is_replaced_only_with_force(tmp_path):
    """Exports of other weights of the run (best.pt, then checkpoint.pt) go to the same default file: the second is
    refused in one line, naming --force, and the first export stays."""
    run = fake_run(tmp_path / "run", "resnet18", 32)
    shutil.copy(run / "best.pt", run / "checkpoint.pt")  # a state_dict stands in for the checkpoint here
    assert export.main([str(run / "best.pt")]) == 0
    first = (run / "export" / "model.pt2").read_bytes(), (run / "export" / "model.pt2.json").read_text()
    with pytest.raises(FgicError, match=re.escape(f"-o/--output {run / 'export' / 'model.pt2'}: exists (an earlier "
                                                  f"fgic.export's?); give another -o OUTPUT, or --force")):
        export.main([str(run / "checkpoint.pt")])
    assert ((run / "export" / "model.pt2").read_bytes(), (run / "export" / "model.pt2.json").read_text()) == first
    assert export.main([str(run / "checkpoint.pt"), "--force"]) == 0
    assert json.loads((run / "export" / "model.pt2.json").read_text())["weights"] == str(run / "checkpoint.pt")
