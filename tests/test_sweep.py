"""fgic.sweep: the grid over datasets, seeds, AMP modes and any other fgic.ddp flag; every combination checked, one
run folder each, named as before when nothing new is swept."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from fgic import config, data, sweep
from fgic.errors import FgicError


def names(combos) -> list[str]:
    return [c.run_dir.name for c in combos]


def test_datasets_seeds_and_amps_keep_the_run_names_of_fgic_ddp(tiny_data, tmp_path):
    combos = sweep.plan([str(tiny_data)], [0, 1], ["off", "bf16"], [], ["--output-dir", str(tmp_path)])
    assert names(combos) == ["resnet50-off-s0", "resnet50-bf16-s0", "resnet50-off-s1", "resnet50-bf16-s1"]
    for c in combos:  # the folder fgic.ddp itself will write to, for the same argv
        run = config.parse(c.argv)
        assert c.run_dir == config.run_dir(run, data.resolve(run.data, run.data_root)[0])


def test_any_flag_sweeps_into_its_own_run_folder(tiny_data):
    combos = sweep.plan([str(tiny_data)], [0], ["off"], ["lr=0.05,0.1", "--arch=resnet18,vit_b_32", "b=32,64"],
                        ["--crop", "64", "--resize", "72", "-n", "try"])
    assert len(combos) == 8 and len({c.run_dir for c in combos}) == 8
    # the arch is in the name already; the others go into the note, after the user's; the last axis varies fastest
    assert names(combos)[:3] == ["resnet18-off-s0-try-lr0.05-batch-size32", "resnet18-off-s0-try-lr0.05-batch-size64",
                                 "vit_b_32-off-s0-try-lr0.05-batch-size32"]
    run = config.parse(combos[2].argv)
    assert (run.lr, run.arch, run.batch_size, run.note) == (0.05, "vit_b_32", 32, "try-lr0.05-batch-size32")
    assert combos[2].swept == {"lr": "0.05", "arch": "vit_b_32", "batch_size": "32"}


@pytest.mark.parametrize("flag,method", [("warmup-epochs", "linear"), ("lr-warmup-epochs", "constant")])
def test_an_alias_is_passed_as_named(tiny_data, flag, method):
    """timm's --warmup-epochs means a linear warmup, torchvision's --lr-warmup-epochs its --lr-warmup-method's
    (constant): a sweep passes the name it was given, as on the command line."""
    combos = sweep.plan([str(tiny_data)], [0], ["off"], [f"{flag}=0,2"], [])
    run = config.parse(combos[1].argv)
    assert (run.lr_warmup_epochs, run.lr_warmup_method) == (2, method)
    assert names(combos)[1] == "resnet50-off-s0-lr-warmup-epochs2"


def test_switches_sweep_as_on_and_off(tiny_data):
    combos = sweep.plan([str(tiny_data)], [0], ["off"], ["model-ema=on,off", "compile=on,off"], ["--recipe", "tv-v2"])
    parsed = [config.parse(c.argv) for c in combos]
    # off says --no-model-ema and --no-compile, so that it overrides a recipe's or the common flags' on
    assert [(p.model_ema, p.compile) for p in parsed] == [(True, True), (True, False), (False, True), (False, False)]
    assert names(combos) == ["resnet50-off-tv-v2-s0-model-ema-compile", "resnet50-off-tv-v2-s0-model-ema",
                             "resnet50-off-tv-v2-s0-compile", "resnet50-off-tv-v2-s0"]


@pytest.mark.parametrize("specs,extra,message", [
    (["seed=1,2"], [], "--sweep 'seed=1,2': sweep --seed with --seeds"),
    (["data=a,b"], [], "sweep --data with --datasets"),
    (["amp=off,bf16"], [], "sweep --amp with --amps"),
    (["output-dir=a,b"], [], "--output-dir cannot be swept: one runs folder holds the sweep"),
    (["note=a,b"], [], "--note cannot be swept"),
    (["lrr=0.1"], [], "--sweep 'lrr=0.1': give FLAG=V1,V2,... with FLAG an fgic.ddp flag, e.g. lr=0.05,0.1 (--lrr is "
                      "not an fgic.ddp flag)"),
    (["lr"], [], "--sweep 'lr': give FLAG=V1,V2,..."),
    (["lr=0.1,,0.2"], [], "give distinct, non-empty values"),
    (["lr=0.1,0.1"], [], "give distinct, non-empty values"),
    (["lr=0.1", "lr=0.2"], [], "--sweep: name each flag once"),
    (["compile=yes"], [], "--compile is a switch: sweep it as compile=on,off"),
    (["tensorboard=on,off"], ["--tensorboard"], "--tensorboard is also among the flags for every run; leave it out"),
    (["lr=0.1,fast"], [], "-d DATA --seed 0 --amp off --sweep lr=fast: argument --lr: invalid float value: 'fast'"),
    (["epochs=0,2"], [], "--epochs 0: must be at least 1"),
    ([], ["--epochz", "2"], "the flags for every run: unrecognized arguments: --epochz 2"),
    (["weights=a/b.pt,c/b.pt"], [], "would share the run folder"),
    (["weights=imagenet:X,imagenet-X"], [], "would share the run folder"),
    (["crop=64,70"], ["--arch", "vit_b_32", "--resize", "80"], "--arch vit_b_32 cannot take --crop 70"),
    (["pretrained=on,off"], [], "--sweep 'pretrained=on,off': --pretrained sets --weights imagenet, and leaving it "
                                "out keeps --weights as the recipe has it; sweep weights=... instead"),
    ([], ["-a", "bf16"], "the flags for every run give -a, which the sweep's --amps would override"),
    ([], ["--seed=7"], "the flags for every run give --seed=7, which the sweep's --seeds would override"),
    ([], ["-s7"], "the flags for every run give -s7"),
    ([], ["--data-path", "x"], "the flags for every run give --data-path, which the sweep's --datasets would"),
])
def test_every_combination_is_checked_with_one_line(tiny_data, specs, extra, message):
    with pytest.raises(FgicError, match=re.escape(message.replace("DATA", str(tiny_data)))):
        sweep.plan([str(tiny_data)], [0], ["off"], specs, extra)


def test_auto_amp_is_refused_in_a_sweep(tiny_data):
    """auto resolves on the machine that trains (bf16 on most GPUs, off on the CPU): the run folders a sweep names
    beforehand would not be the ones trained, and auto and bf16 could share one."""
    with pytest.raises(FgicError, match="--amps auto: a sweep names its run folders before any job runs"):
        sweep.plan([str(tiny_data)], [0], ["auto", "bf16"], [], [])


def test_a_dataset_missing_is_refused_unless_inside_a_job(tiny_data, tmp_path):
    datasets = [str(tiny_data), str(tmp_path / "gone")]
    with pytest.raises(FgicError, match=re.escape(f"-d {tmp_path / 'gone'}: no such folder")):
        sweep.plan(datasets, [0], ["off"], [], [])
    # --no-check: a job's lookup; the gone dataset's run fails alone, with its record
    assert names(sweep.plan(datasets, [0], ["off"], [], [], check=False)) == ["resnet50-off-s0"] * 2


@pytest.mark.parametrize("given,runs,folder", [
    ([], None, "runs"), ([], "/r", "/r"), (["--output-dir", "/o"], None, "/o"), (["--output-dir=/o"], None, "/o"),
    (["--output", "/o"], None, "/o"), (["--output-dir", "/o"], "/o", "/o"), (["--output-dir", "o"], "./o", "o")])
def test_the_runs_folder_is_fgic_args_output_dir_else_runs(given, runs, folder):
    combo, = sweep.plan(["demo"], [0], ["off"], [], sweep.with_runs(["--epochs", "2", *given], runs), check=False)
    assert combo.run_dir == Path(folder) / "demo" / "resnet18-off-s0"
    assert sum(a.startswith("--output") for a in combo.argv) == 1


def test_fgic_args_output_dir_and_another_runs_folder_are_refused():
    with pytest.raises(FgicError, match=re.escape("--output-dir /o (in FGIC_ARGS) and --runs /r (RUNS) name two runs "
                                                  "folders; give one of them")):
        sweep.with_runs(["--output-dir", "/o"], "/r")


ARRAY = {"SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "6", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0",
         "SLURM_ARRAY_TASK_MAX": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_PROCID": "0"}


@pytest.fixture
def task(tmp_path, monkeypatch):
    """`run` on the second of 2 combinations, with the training's exit code and `scontrol show job` stood in for:
    sets `code` and `state`, returns run's exit code."""
    combos = sweep.plan(["demo"], [3], ["off"], ["lr=0.1,0.2"], ["--output-dir", str(tmp_path)], check=False)
    calls, given = [], {"code": 0, "state": "RUNNING"}
    monkeypatch.setattr(sweep.subprocess, "call", lambda cmd: calls.append(cmd) or given["code"])
    monkeypatch.setattr(sweep.requeue, "show", lambda job: f"JobId={job} JobState={given['state']}\n   StdOut=/l/x.out")
    monkeypatch.setattr(sweep.signals, "hold", lambda env: None)  # not in this process's signal mask

    def go(code, state="RUNNING", **env):
        given.update(code=code, state=state)
        return sweep.run(combos, {**ARRAY, **env})

    go.calls, go.record = calls, tmp_path / "failed" / "demo-resnet18-off-s3-lr0.2.json"
    return go


def test_run_trains_its_combination_and_records_a_failure_not_a_stop(task, capsys):
    assert task(2) == 2
    assert task.calls == [[sys.executable, "-m", "launch.torchrun", "--output-dir", str(task.record.parents[1]),
                           "-d", "demo", "--seed", "3", "--amp", "off", "--lr", "0.2", "-n", "lr0.2"]]
    assert capsys.readouterr().out.startswith("fgic sweep: task 1 of 2: --output-dir ")
    assert json.loads(task.record.read_text()) == {"dataset": "demo", "seed": 3, "amp": "off",
                                                   "args": ["--lr", "0.2", "-n", "lr0.2"], "exit_code": 2,
                                                   "log": "/l/x.out"}
    assert task(0) == 0 and not task.record.exists()  # a success clears it
    assert task(75) == 75 and not task.record.exists()  # one process stopped
    assert task(1, "COMPLETING") == 1 and not task.record.exists()  # torchrun's 1 after a requeue or a cancel
    assert "exit code 1 while Slurm ends job 6_1 (COMPLETING: requeued or cancelled); no failure record" in \
        capsys.readouterr().err
    assert task(-9) == 137 and json.loads(task.record.read_text())["exit_code"] == 137  # killed, the job running
    assert task(0, SLURM_PROCID="1") == 0 and task.record.exists()  # the record is the first node's
    assert task(1, SLURM_PROCID="1") == 1


@pytest.mark.parametrize("low,high,count", [("0", "2", "3"), ("1", "1", "1"), ("0", "1", "3")])
def test_run_refuses_a_job_array_that_is_not_the_sweeps(task, low, high, count):
    env = {"SLURM_ARRAY_TASK_MIN": low, "SLURM_ARRAY_TASK_MAX": high, "SLURM_ARRAY_TASK_COUNT": count}
    with pytest.raises(FgicError, match=re.escape("but the sweep has 2 combinations; submit with sbatch --array=0-1 "
                                                  "slurm/sweep.sh, or run bash slurm/sweep.sh to have it choose")):
        task(0, **env)
    assert not task.calls


def test_a_sweep_with_wandb_puts_its_runs_in_one_group_of_its_own(tiny_data):
    def groups(specs, argv):
        combos = sweep.plan([str(tiny_data)], [0, 1], ["off"], specs, ["--crop", "64", "--resize", "72", *argv])
        return {config.get_args_parser().parse_args(c.argv).wandb_group for c in combos}

    one = groups(["lr=0.05,0.1"], ["--wandb"])
    assert len(one) == 1 and re.fullmatch(r"sweep-lr-[0-9a-f]{6}", next(iter(one)))
    assert groups(["lr=0.05,0.1"], ["--wandb"]) == one  # submitted again: the same group
    assert groups(["lr=0.05,0.2"], ["--wandb"]) != one  # another sweep: another group
    assert groups(["lr=0.05,0.1"], ["--wandb", "--wandb-group", "mine"]) == {"mine"}
    assert groups(["lr=0.05,0.1"], []) == {None}  # no W&B, no group
    with pytest.raises(FgicError, match="--wandb-group cannot be swept: a sweep's runs share one W&B group"):
        sweep.plan([str(tiny_data)], [0], ["off"], ["wandb-group=a,b"], [])
