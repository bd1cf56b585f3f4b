"""Bad input: exit code 2, one line naming the file or flag and what to do, no traceback (the command-line entry
run in-process for each case, and the real command once)."""
from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch
import torchvision

from fgic import cluster, ddp
from fgic.cli import run_cli
from fgic.demo import make_tiny
from fgic.errors import FgicError
from tests.helpers import run_fgic, tiny_args


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("d") / "good", (6, 6), (2, 2))


def broken(tmp_path, good, what):
    root = tmp_path / what
    shutil.copytree(good, root)
    if what == "no_test":
        shutil.rmtree(root / "test")
    elif what == "no_classes":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif what == "empty_class":
        for f in (root / "test" / "class_01").iterdir():
            f.unlink()
        (root / "test" / "class_01" / "README").write_text("no images here")
    elif what == "other_classes":
        (root / "test" / "class_01").rename(root / "test" / "class_09")
    elif what == "bad_image":  # found by the scan, after the model is built
        (root / "train" / "class_00" / "text.jpg").write_text("not an image")
    return root


CASES = [  # (case, extra flags, what the one line must say)
    ("missing_folder", [], "no such folder"),
    ("registry_name", ["-d", "cub"], "-d cub: no dataset at"),
    ("no_test", [], "test: missing"),
    ("no_classes", [], "no class folders"),
    ("empty_class", [], "class_01: no images"),
    ("other_classes", [], "different classes"),
    ("bad_image", [], "1 unreadable or truncated image(s)"),
    ("unknown_arch", ["--arch", "resnet5"], "--arch resnet5: not a torchvision classification model"),
    ("bad_amp", ["-a", "fp8"], "-a/--amp"),
    ("big_batch", ["--batch-size", "64"], "larger than the 12 training images"),
    ("weights_file", ["--weights", "nowhere.pt"], "--weights nowhere.pt: no such file"),
    ("resume_file", ["--resume", "nowhere.pt"], "--resume nowhere.pt: no such file"),
    ("eval_only_two_models", ["--eval-only", "--resume", "a.pt", "--weights", "b.pt"],
     "--eval-only scores one model: give --resume a.pt or --weights b.pt, not both"),
    ("eval_only_nothing", ["--eval-only"], "--eval-only: nothing to score (no checkpoint.pt in "),
    ("output_dir_is_a_file", ["--output-dir", "/dev/null"], "--output-dir: cannot write the run folder /dev/null/"),
    ("cache_dir_is_a_file", ["--cache", "on", "--cache-dir", "/dev/null"], "--cache-dir /dev/null: cannot create it"),
    ("repeated_gpu_id", ["-g", "0,1,0"], "-g/--gpu 0,1,0: give each GPU id once"),
    ("rate_the_arch_lacks", ["--stochastic-depth", "0.1"], "--stochastic-depth: torchvision's resnet18 has no such"),
    ("rate_out_of_range", ["--dropout", "1.5"], "--dropout 1.5: must be in [0, 1"),
]
if not torch.cuda.is_available():
    CASES += [("no_cuda", ["--device", "cuda"], "--device cuda: no CUDA GPU"),
              ("no_gpu_id", ["--device", "auto", "-g", "3"], "-g/--gpu 3: no CUDA GPU"),
              ("no_gpu_ids", ["--device", "auto", "-g", "0,1"], "-g/--gpu 0,1: no CUDA GPU")]


@pytest.fixture
def in_process(monkeypatch):
    """fgic.ddp's command-line entry run in this process: (exit code, last line of stderr)."""
    def run(args, capsys):
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: ddp.main(args), "fgic.ddp")
        lines = capsys.readouterr().err.strip().splitlines()
        return exit_.value.code, lines[-1] if lines else ""
    yield run
    torch.use_deterministic_algorithms(False)  # --deterministic may have set it before the error


@pytest.mark.parametrize("case,extra,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(tmp_path, good, case, extra, message, in_process, capsys, monkeypatch):
    def relaunch(gpus, argv):  # -g with several ids starts one process per GPU, after every id is checked
        raise AssertionError(f"relaunched for -g {gpus} before the ids were checked")
    monkeypatch.setattr(cluster, "relaunch_per_gpu", relaunch)
    data = tmp_path / "absent" if case == "missing_folder" else (
        broken(tmp_path, good, case) if case in ("no_test", "no_classes", "empty_class", "other_classes",
                                                 "bad_image") else good)
    args = ["-d", str(data), *tiny_args(epochs=1, batch_size=6), "--data-root", str(tmp_path / "root"),
            "--output-dir", str(tmp_path / "runs"), *extra]
    code, line = in_process(args, capsys)
    print(f"{case}: {line}")
    assert code == 2 and line.startswith("fgic.ddp: error: ") and message in line, line
    assert not (tmp_path / "runs").exists(), "a failed start left a folder behind"


def fake_checkpoint(path, arch="resnet18", num_classes=2, **trained):
    """An fgic checkpoint of an untrained model (its config holds what --eval-only checks)."""
    model = torchvision.models.get_model(arch, num_classes=num_classes)
    torch.save({"model": model.state_dict(), "epoch": 1,
                "config": {"arch": arch, "num_classes": num_classes, **trained}}, path)
    return path


@pytest.mark.parametrize("case", ["eval_resume", "eval_weights", "train_weights"])
def test_a_model_of_another_arch_is_one_line(tmp_path, good, case, in_process, capsys):
    """--arch resnet34 given a resnet18 checkpoint or state_dict: one line naming the mismatch, no traceback."""
    ckpt = fake_checkpoint(tmp_path / "r18.pt")
    flag = "--resume" if case == "eval_resume" else "--weights"
    args = ["-d", str(good), *tiny_args(epochs=1, batch_size=6), "--arch", "resnet34", "--output-dir",
            str(tmp_path / "runs"), flag, str(ckpt), *(["--eval-only"] if case.startswith("eval") else [])]
    code, line = in_process(args, capsys)
    print(f"{case}: {line}")
    want = (f"--weights {ckpt}: does not fit --arch" if case == "train_weights" else
            f"--eval-only {flag} {ckpt}: trained with --arch resnet18, these flags give --arch resnet34; give --arch "
            f"resnet18")
    assert code == 2 and line.startswith("fgic.ddp: error: ") and want in line, line


SCORED = [  # (case, what the model was trained with, what the one line must say)
    ("sizes", {"resize": 72, "crop": 56}, "trained with --crop 56, these flags give --crop 64; give --crop 56"),
    ("normalisation", {"mean": [0.5] * 3, "std": [0.5] * 3},
     "trained with --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5, these flags give --mean 0.485 0.456 0.406 --std 0.229 0.224 "
     "0.225; give --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5"),
    ("classes", {"num_classes": 5}, "trained for 5 classes, this -d has 2; give the -d it was trained on"),
]


@pytest.mark.parametrize("case,trained,message", SCORED, ids=[c[0] for c in SCORED])
@pytest.mark.parametrize("given", ["checkpoint", "weights_in_a_run", "weights_from_elsewhere"])
def test_a_model_is_scored_as_it_was_trained(tmp_path, good, case, trained, message, given, in_process, capsys):
    """--eval-only with flags that would score a model otherwise than it was trained (the test transform, the class
    count): one line naming the flags to give. A checkpoint carries its config, a weights file in a run folder has
    the run's config.json beside it; one from elsewhere is checked only for its head."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = fake_checkpoint(run / "checkpoint.pt", **trained)
    if given != "checkpoint":
        torch.save(torch.load(ckpt, weights_only=True)["model"], run / "best.pt")
        ckpt.unlink()
        if given == "weights_in_a_run":
            (run / "config.json").write_text(json.dumps({"arch": "resnet18", "num_classes": 2, **trained}))
    flag, path = ("--resume", ckpt) if given == "checkpoint" else ("--weights", run / "best.pt")
    args = ["-d", str(good), *tiny_args(epochs=1, batch_size=6), "--output-dir", str(tmp_path / "runs"), "--eval-only",
            flag, str(path)]
    code, line = in_process(args, capsys)
    if given == "weights_from_elsewhere" and case != "classes":
        assert code == 0, line  # nothing says how it was trained: scored with the flags' transform
        return
    if given == "weights_in_a_run" and case == "normalisation":
        assert code == 0, line  # --mean/--std default to the weights' own: the run's config.json
        return
    if given == "weights_from_elsewhere":
        message = (f"--weights {path}: its head has another class count (fc.bias: (5,), this -d needs (2,)); give "
                   f"the -d it was trained on")
    else:
        message = f"--eval-only {flag} {path}: {message}"
    assert code == 2 and line == f"fgic.ddp: error: {message}", line


@pytest.mark.e2e
class Writes(list):
    def write(self, text):
        self.append(text)

    def flush(self):
        pass


@pytest.mark.parametrize("raised,line,code", [(FgicError("bad flag", shown=True), "fgic.ddp: error: bad flag\n", 2),
                                              (KeyboardInterrupt(), "fgic.ddp: interrupted\n", 130)])
def test_a_line_every_rank_prints_is_one_write(monkeypatch, raised, line, code):
    """Under PYTHONUNBUFFERED=1 each write is a system call of its own: print's text and newline apart ran two ranks'
    lines together in CI's log (\"...its message is abovefgic.ddp: error: ...\")."""
    writes = Writes()
    monkeypatch.setattr(sys, "stderr", writes)

    def fail():
        raise raised
    with pytest.raises(SystemExit) as exit_:
        run_cli(fail, "fgic.ddp")
    assert exit_.value.code == code and writes == [line]


@pytest.mark.e2e
def test_the_real_command_prints_one_line_and_exits_2(tmp_path, good):
    res = run_fgic(["-d", str(good), *tiny_args(epochs=1), "--arch", "resnet5", "--output-dir", str(tmp_path)])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["fgic.ddp: error: --arch resnet5: not a torchvision classification "
                                               "model; did you mean resnet50, resnet152, resnet34?"]


@pytest.mark.e2e
def test_batch_that_does_not_split_over_the_processes(tmp_path, good):
    res = run_fgic(["-d", str(good), *tiny_args(epochs=1, batch_size=7), "--output-dir", str(tmp_path)], nproc=2)
    assert res.returncode != 0
    assert "-b/--batch-size 7 does not split evenly over 2 processes; use a multiple of 2" in res.stderr
    assert not re.search(r'File ".*/fgic/', res.stderr)  # torchrun reports the failed workers; no fgic traceback
