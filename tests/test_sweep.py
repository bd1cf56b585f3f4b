"""fgic.sweep: the grid over datasets, seeds, AMP modes and any other fgic.ddp flag; every combination checked, one
run folder each, named as before when nothing new is swept."""
from __future__ import annotations

import json
import re

import pytest

from fgic import config, data, sweep
from fgic.errors import FgicError


def names(combos) -> list[str]:
    return [c.run_dir.name for c in combos]


def test_datasets_seeds_and_amps_keep_the_run_names_of_fgic_ddp(tiny_data, tmp_path):
    combos = sweep.plan([str(tiny_data)], [0, 1], ["off", "bf16"], [], ["--output-dir", str(tmp_path)])
    assert names(combos) == ["resnet50-off-s0", "resnet50-bf16-s0", "resnet50-off-s1", "resnet50-bf16-s1"]
    for c in combos:  # the folder fgic.ddp itself will write to, for the same argv
        run = config.resolve(config.get_args_parser().parse_args(c.argv))
        assert c.run_dir == config.run_dir(run, data.resolve(run.data, run.data_root)[0])


def test_any_flag_sweeps_into_its_own_run_folder(tiny_data):
    combos = sweep.plan([str(tiny_data)], [0], ["off"], ["lr=0.05,0.1", "--arch=resnet18,vit_b_32", "b=32,64"],
                        ["--crop", "64", "--resize", "72", "-n", "try"])
    assert len(combos) == 8 and len({c.run_dir for c in combos}) == 8
    # the arch is in the name already; the others go into the note, after the user's; the last axis varies fastest
    assert names(combos)[:3] == ["resnet18-off-s0-try-lr0.05-batch-size32", "resnet18-off-s0-try-lr0.05-batch-size64",
                                 "vit_b_32-off-s0-try-lr0.05-batch-size32"]
    run = config.resolve(config.get_args_parser().parse_args(combos[2].argv))
    assert (run.lr, run.arch, run.batch_size, run.note) == (0.05, "vit_b_32", 32, "try-lr0.05-batch-size32")
    assert combos[2].swept == {"lr": "0.05", "arch": "vit_b_32", "batch_size": "32"}


def test_switches_sweep_as_on_and_off(tiny_data):
    combos = sweep.plan([str(tiny_data)], [0], ["off"], ["model-ema=on,off", "compile=on,off"], ["--recipe", "tv-v2"])
    parsed = [config.resolve(config.get_args_parser().parse_args(c.argv)) for c in combos]
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
])
def test_every_combination_is_checked_with_one_line(tiny_data, specs, extra, message):
    with pytest.raises(FgicError, match=re.escape(message.replace("DATA", str(tiny_data)))):
        sweep.plan([str(tiny_data)], [0], ["off"], specs, extra)


def test_a_dataset_missing_is_refused_unless_inside_a_job(tiny_data, tmp_path):
    datasets = [str(tiny_data), str(tmp_path / "gone")]
    with pytest.raises(FgicError, match=re.escape(f"-d {tmp_path / 'gone'}: no such folder")):
        sweep.plan(datasets, [0], ["off"], [], [])
    # --no-check: a job's lookup; the gone dataset's run fails alone, with its record
    assert names(sweep.plan(datasets, [0], ["off"], [], [], check=False)) == ["resnet50-off-s0"] * 2


def test_task_and_failed_give_sweep_sh_its_lines_and_record(tiny_data, tmp_path, capsys):
    grid = ["--datasets", str(tiny_data), "--seeds", "3", "--amps", "off", "--sweep", "lr=0.1,0.2", "--no-check",
            "--", "--epochs", "2", "--output-dir", str(tmp_path)]
    assert sweep.main(["task", "1", *grid]) == 0
    count, label, *argv = capsys.readouterr().out.splitlines()
    assert (count, label) == ("2", "tiny-resnet50-off-s3-lr0.2")
    assert argv == ["--epochs", "2", "--output-dir", str(tmp_path), "-d", str(tiny_data), "--seed", "3", "--amp", "off",
                    "--lr", "0.2", "-n", "lr0.2"]
    assert sweep.main(["failed", "1", "2", "/logs/x.out", *grid]) == 0
    record = json.loads((tmp_path / "failed" / f"{label}.json").read_text())
    assert record == {"dataset": str(tiny_data), "seed": 3, "amp": "off", "args": ["--epochs", "2", "--lr", "0.2",
                      "-n", "lr0.2"], "exit_code": 2, "log": "/logs/x.out"}
    with pytest.raises(FgicError, match="failed 5: give an index from 0 to 1"):
        sweep.main(["failed", "5", "2", "", *grid])


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
