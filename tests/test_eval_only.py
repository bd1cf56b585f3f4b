"""--eval-only scores the model the user names (a checkpoint, or --weights FILE), says which in its line, and writes
eval.json where the README says: the run folder for a checkpoint, eval-STEM beside a --weights FILE."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers import read_jsonl, run_fgic, tiny_args

pytestmark = pytest.mark.e2e  # every test here starts processes
EMA = ("--model-ema", "--model-ema-steps", "1")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One short run with an EMA: its flags, its folder."""
    out = tmp_path_factory.mktemp("runs")
    args = ["-d", str(tiny_data), *tiny_args(), *EMA, "--output-dir", str(out)]
    res = run_fgic(args)
    assert res.returncode == 0, res.stderr
    return args, out / "tiny" / "resnet18-off-s2020"


def test_weights_file_is_scored_even_beside_a_run_folder_checkpoint(trained, tmp_path):
    """The flags name a run folder with a checkpoint (--resume auto); --weights FILE still wins, and its eval goes
    beside FILE, not into that run's eval.json."""
    args, run = trained
    state = torch.load(run / "best.pt", weights_only=True)
    state["fc.weight"].zero_()
    state["fc.bias"].copy_(torch.tensor([0.0, 0.0, 1.0]))  # every image taken for class_02: 33 of 101
    rigged = tmp_path / "other" / "rigged.pt"
    rigged.parent.mkdir()
    torch.save(state, rigged)
    res = run_fgic([*args, "--eval-only", "--weights", str(rigged)])
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "other" / "eval-rigged"
    ev = json.loads((folder / "eval.json").read_text())
    assert (ev["correct"], ev["total"], ev["model"]) == (33, 101, str(rigged))
    assert f"fgic: eval of {rigged}: top-1 32.67%" in res.stdout and (folder / "eval_confused.md").is_file()
    assert not (run / "eval.json").exists()


def test_without_resume_or_weights_the_run_folders_checkpoint_is_scored_and_named(trained):
    args, run = trained
    res = run_fgic([*args, "--eval-only"])
    assert res.returncode == 0, res.stderr
    ev = json.loads((run / "eval.json").read_text())
    assert ev["correct"] == read_jsonl(run / "metrics.jsonl")[-1]["ema_test_correct"]
    assert ev["model"] == f"{run / 'checkpoint.pt'} (EMA)"
    assert f"fgic: eval of {run / 'checkpoint.pt'} (EMA): top-1 {ev['acc']:.2f}%" in res.stdout
    (run / "eval.json").unlink()


def test_a_checkpoint_is_not_credited_to_another_runs_folder(trained, tmp_path):
    """--resume PATH of another run, with flags whose run folder holds its own checkpoint: refused in one line
    rather than writing an eval.json that folder's model would be taken for."""
    args, run = trained
    other = tmp_path / "other.pt"
    other.write_bytes((run / "checkpoint.pt").read_bytes())
    res = run_fgic([*args, "--eval-only", "--resume", str(other)])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"fgic.ddp: error: --eval-only --resume {other}: the run "
                                                          f"folder these flags name, {run}, holds another model")
    assert not (run / "eval.json").exists()


def test_the_checkpoint_named_is_scored_not_the_run_it_started(trained, tmp_path):
    """--eval-only --resume PATH with flags whose run folder holds a run started from PATH (training would continue
    that run, as a requeue does): PATH is the model named, so the folder's other model is refused in one line, not
    scored as PATH's."""
    args, run = trained
    snap = tmp_path / "snap.pt"
    shutil.copy(run / "checkpoint.pt", snap)
    started = tmp_path / "b" / "tiny" / run.name
    shutil.copytree(run, started)
    ckpt = torch.load(started / "checkpoint.pt", weights_only=True)
    ckpt["config"]["resume"] = str(snap)  # the run `--resume snap.pt` started in that folder
    torch.save(ckpt, started / "checkpoint.pt")
    res = run_fgic([*args, "--output-dir", str(tmp_path / "b"), "--eval-only", "--resume", str(snap)])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"fgic.ddp: error: --eval-only --resume {snap}: the run "
                                                          f"folder these flags name, {started}, holds another model")
    assert not (started / "eval.json").exists()


def test_a_checkpoint_given_as_weights_is_scored_as_one(trained):
    """--weights RUN/checkpoint.pt with --model-ema: the checkpoint's EMA model, as --resume scores it (before, its
    plain weights, the EMA flag unsaid), into eval-checkpoint/ beside it."""
    args, run = trained
    res = run_fgic([*args, "--eval-only", "--weights", str(run / "checkpoint.pt")])
    assert res.returncode == 0, res.stderr
    ev = json.loads((run / "eval-checkpoint" / "eval.json").read_text())
    assert ev["model"] == f"{run / 'checkpoint.pt'} (EMA)"
    assert ev["correct"] == read_jsonl(run / "metrics.jsonl")[-1]["ema_test_correct"]


def test_a_dataset_whose_classes_are_named_otherwise_is_refused(trained, tiny_data, tmp_path):
    """A class folder renamed (or a mirror without the numeric prefixes, sorted otherwise): as many classes, but the
    labels would shift, and eval.json's per-class accuracies and confusions would name the wrong classes."""
    args, run = trained
    other = tmp_path / "tiny"
    shutil.copytree(tiny_data, other)
    for split in ("train", "test"):
        (other / split / "class_00").rename(other / split / "class_99")  # sorted last now
    flags = [other if a == str(tiny_data) else a for a in args]
    res = run_fgic([*map(str, flags), "--eval-only", "--resume", str(run / "checkpoint.pt")])
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (f"fgic.ddp: error: --eval-only --resume {run / 'checkpoint.pt'}: trained on other "
                                  f"classes than this -d's ('class_00' -> 'class_01'); give the -d it was trained on")
    assert not list(tmp_path.rglob("eval.json"))
