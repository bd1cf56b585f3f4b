import dataclasses
import re

import pytest
import torch

from fgic import augment, config, engine, models
from fgic.errors import FgicError


def parse(*argv):
    return config.parse(list(argv))


def test_recipe_defaults():
    a = parse("-d", "cub")
    assert (a.arch, a.weights, a.batch_size, a.epochs, a.resize, a.crop, a.padding) == \
        ("resnet50", "imagenet", 64, 128, 512, 448, 8)
    assert (a.momentum, a.weight_decay, a.label_smoothing, a.seed, a.amp, a.resume) == \
        (0.9, 5e-4, 0.1, 2020, "auto", "auto")  # amp auto: fgic.engine.resolve_amp for the device
    assert a.lr == pytest.approx(64 / 256 * 0.1)


def test_lr_follows_the_global_batch_unless_given():
    assert parse("-d", "cub", "-b", "256").lr == pytest.approx(0.1)
    assert parse("-d", "cub", "-b", "256", "--lr", "0.3").lr == pytest.approx(0.3)


def test_demo_defaults_only_fill_unset_flags():
    a = parse("-d", "demo")
    assert (a.arch, a.weights, a.crop, a.epochs) == ("resnet18", "none", 64, config.DEMO["epochs"])
    b = parse("-d", "demo", "--epochs", "3", "--arch", "resnet50", "--crop", "56")
    assert (b.epochs, b.arch, b.crop, b.weights) == (3, "resnet50", 56, "none")


@pytest.mark.parametrize("flags,resize,crop", [
    (("--img-size", "224"), 256, 224),  # timm's name: a 512 px resize left 19% of the image in the test crop
    (("--train-crop-size", "384"), 439, 384),
    (("--crop", "224", "--resize", "224"), 224, 224),  # typed: kept
    ((), 512, 448),
])
def test_a_crop_given_alone_brings_the_resize_at_the_recipes_ratio(flags, resize, crop):
    a = parse("-d", "cub", *flags)
    assert (a.resize, a.crop) == (resize, crop)


def test_compile_is_off_by_default_and_its_mode_is_speed_only():
    """--compile stays off until a GPU measurement of a whole run decides it (BENCHMARKS.md); --compile-mode picks
    kernels, not arithmetic: a resume across modes is not refused (it is not in MEANING), as across process counts."""
    a = parse("-d", "cub")
    assert (a.compile, a.compile_mode) == (False, "default")
    assert parse("-d", "cub", "--compile", "--compile-mode", "max-autotune-no-cudagraphs").compile_mode == \
        "max-autotune-no-cudagraphs"
    assert "compile" not in config.MEANING and "compile_mode" not in config.MEANING
    with pytest.raises(FgicError, match="--compile-mode"):
        parse("-d", "cub", "--compile-mode", "fastest")


@pytest.mark.parametrize("given,mode", [("off", "off"), ("bf16", "bf16"), ("FP16", "fp16"), ("0", "off"),
                                        ("2", "fp16")])
def test_amp_modes(given, mode):
    assert parse("-d", "cub", "-a", given).amp == mode


def test_legacy_apex_amp_maps_to_native_fp16_with_a_notice(capsys):
    assert parse("-d", "cub", "-a", "1").amp == "fp16"
    assert "apex" in capsys.readouterr().err


@pytest.mark.parametrize("argv,flag", [
    ((), "-d/--data"),
    (("-a", "fp8"), "-a/--amp"),
    (("-n", "my run"), "-n/--note"),
    (("-b", "0"), "--batch-size"),
    (("--crop", "600", "--resize", "512"), "--crop"),
    (("--label-smoothing", "1.5"), "--label-smoothing"),
    (("-w", "-1"), "-w/--workers"),
    (("--lr-warmup-epochs", "128"), "--lr-warmup-epochs"),
    (("--recipe", "tv-v2", "--epochs", "5"), r"--lr-warmup-epochs 5 \(from --recipe tv-v2\): must be fewer than"),
    (("--random-erase", "1.5"), "--random-erase"),
    (("--mixup-alpha", "-1"), "--mixup-alpha"),
    (("--layer-decay", "0"), "--layer-decay"),
    (("--model-ema-decay", "1.5"), "--model-ema-decay"),
    (("--model-ema-steps", "0"), "--model-ema-steps"),
    (("--clip-grad-norm", "-1"), "--clip-grad-norm"),
    (("--norm-weight-decay", "-0.1"), "--norm-weight-decay"),
])
def test_bad_values_name_the_flag(argv, flag):
    data = () if not argv else ("-d", "cub")
    with pytest.raises(FgicError, match=flag):
        parse(*data, *argv)


def test_run_name_is_stable_and_shows_arch_amp_seed_note():
    a = parse("-d", "cub")
    a.amp = engine.resolve_amp(a.amp, torch.device("cpu"))  # as fgic.ddp.resolve does before naming the folder
    assert config.run_name(a) == "resnet50-off-s2020"
    assert config.run_name(parse("-d", "cub", "-a", "bf16", "-s", "1", "-n", "lr.2")) == "resnet50-bf16-s1-lr.2"
    assert config.run_name(parse("-d", "cub", "-a", "off", "--recipe", "tv-v2")) == "resnet50-off-tv-v2-s2020"


def test_parser_is_reusable_as_a_parent():
    import argparse
    p = argparse.ArgumentParser(parents=[config.get_args_parser(add_help=False)])
    p.add_argument("--seeds", nargs="+", type=int)
    a = p.parse_args(["-d", "cub", "--seeds", "0", "1"])
    assert a.seeds == [0, 1] and a.data == "cub"


def test_the_seed_recipe_leaves_every_later_option_off():
    a = parse("-d", "cub")
    weights_own = ("mean", "std")  # unset until fgic.ddp.resolve asks the weights: ImageNet's for the seed's
    assert a.recipe == "seed" and {k: getattr(a, k) for k in config.LATER if k not in weights_own} == \
        {k: v for k, v in config.LATER.items() if k not in weights_own}
    assert (a.mean, a.std) == (None, None) and models.normalization(a.arch, a.weights) == augment.IMAGENET
    assert [config.LATER["mean"], config.LATER["std"]] == [list(augment.IMAGENET.mean), list(augment.IMAGENET.std)]
    assert (a.opt, a.model_ema, a.mixup_alpha, a.auto_augment, a.lr_warmup_epochs, a.layer_decay) == \
        ("sgd", False, 0.0, "none", 0, None)


def test_a_recipe_fills_only_unset_flags_and_keeps_the_lr_rule():
    a = parse("-d", "cub", "--recipe", "tv-v2")
    assert (a.opt, a.auto_augment, a.mixup_alpha, a.cutmix_alpha, a.model_ema, a.lr_warmup_epochs,
            a.norm_weight_decay, a.weight_decay) == ("sgd", "ta_wide", 0.2, 1.0, True, 5, 0.0, 5e-4)
    assert a.lr == pytest.approx(64 / 256 * 0.1) and a.arch == "resnet50"
    t = parse("-d", "cub", "--recipe", "transformer", "-b", "128", "--mixup-alpha", "0", "--no-model-ema")
    assert (t.opt, t.layer_decay, t.weight_decay, t.mixup_alpha, t.model_ema) == ("adamw", 0.65, 0.05, 0.0, False)
    assert t.lr == pytest.approx(128 / 256 * 5e-4)
    d = parse("-d", "demo", "--recipe", "transformer")  # the demo's arch and sizes, the recipe's optimisation
    assert (d.arch, d.crop, d.opt, d.epochs) == ("resnet18", 64, "adamw", 8)


@pytest.mark.parametrize("flags,opt,lr,wd", [
    ((), "sgd", 0.025, 5e-4),
    (("--opt", "adamw"), "adamw", 1.25e-4, 0.05),  # SGD's rule gave AdamW 0.025: 200x MAE's
    (("--recipe", "transformer", "--opt", "sgd"), "sgd", 0.025, 5e-4),  # AdamW's gave SGD 1.25e-4 and wd 0.05
    (("--recipe", "tv-v2", "--opt", "adamw", "-b", "128"), "adamw", 2.5e-4, 0.05),
    (("--opt", "adamw", "--wd", "0.01", "--lr", "0.001"), "adamw", 0.001, 0.01),  # typed values stay
])
def test_the_lr_rule_and_weight_decay_follow_the_optimizer_that_runs(flags, opt, lr, wd):
    a = parse("-d", "cub", *flags)
    assert (a.opt, a.lr, a.weight_decay) == (opt, pytest.approx(lr), wd)


def test_configs_from_before_the_later_options_read_as_the_seed_recipe():
    seed = {**vars(parse("-d", "cub")), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fgic.ddp's
    old = {k: v for k, v in seed.items() if k not in config.LATER}
    assert config.completed(old) == seed


@pytest.mark.parametrize("alias,value,dest,want", [
    ("--model", "vit_b_16", "arch", "vit_b_16"), ("-j", "3", "workers", 3), ("--wd", "0.05", "weight_decay", 0.05),
    ("--data-path", "cub", "data", "cub"), ("--train-crop-size", "60", "crop", 60),
    ("--img-size", "60", "crop", 60),
    ("--aa", "ra", "auto_augment", "ra"), ("--reprob", "0.25", "random_erase", 0.25),
    ("--smoothing", "0.2", "label_smoothing", 0.2), ("--warmup-epochs", "5", "lr_warmup_epochs", 5),
    ("--mixup", "0.8", "mixup_alpha", 0.8), ("--cutmix", "1.0", "cutmix_alpha", 1.0),
    ("--clip-grad", "1.0", "clip_grad_norm", 1.0), ("--output", "/tmp/r", "output_dir", "/tmp/r"),
    ("--test-only", None, "eval_only", True), ("--pretrained", None, "weights", "imagenet"),
    ("--amp", None, "amp", "fp16"), ("--sync-bn", None, "sync_bn", True)])
def test_the_references_flag_names_are_aliases(alias, value, dest, want):
    """torchvision's classification reference and timm's train.py names, each for its fgic flag (a bare --amp is
    their fp16 autocast)."""
    argv = ["-d", "demo", "--epochs", "9", alias, *([value] if value else [])]
    assert getattr(parse(*argv), dest) == want
    assert f"{alias}" in config.get_args_parser().format_help()  # the help lists it


@pytest.mark.parametrize("argv,message", [
    (["--mod", "resnet50"], "unknown flag --mod: did you mean --model? (python -m fgic.ddp -h lists the flags)"),
    (["--epoch", "3"], "unknown flag --epoch: did you mean --epochs?"),  # an abbreviation is not taken
    (["--modelema"], "unknown flag --modelema: did you mean --model-ema?"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten' (python -m fgic.ddp -h lists the flags)"),
    (["--opt", "adamm"], "argument --opt: invalid choice: 'adamm'")])
def test_an_unknown_flag_or_a_bad_value_is_one_line(argv, message):
    with pytest.raises(FgicError, match=re.escape(message)):
        parse("-d", "demo", *argv)


def test_a_presets_value_that_does_not_fit_names_the_preset():
    with pytest.raises(FgicError, match=re.escape("--lr-warmup-epochs 5 (from --recipe tv-v2): must be fewer than "
                                                  "--epochs 2; pass --lr-warmup-epochs 0 or more epochs")):
        parse("-d", "demo", "--recipe", "tv-v2", "--epochs", "2")
    with pytest.raises(FgicError, match=re.escape("--lr-warmup-epochs 3: must be fewer than --epochs 2")):
        parse("-d", "demo", "--lr-warmup-epochs", "3", "--epochs", "2")


def test_every_flag_says_whether_it_changes_the_result():
    """A flag left out of MEANING would let a resume continue silently across a change that matters: each of the
    parser's flags is in MEANING (a resume refuses a change) or INCIDENTAL (it may change), not both."""
    dests = {a.dest for a in config.get_args_parser()._actions if a.dest != "help"}
    assert sorted(dests - set(config.MEANING) - set(config.INCIDENTAL)) == [], "flags neither list classifies"
    assert sorted(set(config.MEANING) & set(config.INCIDENTAL)) == []
    assert sorted(set(config.INCIDENTAL) - dests) == [] and set(config.MEANING) - dests == {"dataset", "num_classes"}
    places = {(f.meaning, f.key) for f in config.EVERY_FLAG if f.meaning}  # --pretrained and --weights: one option
    assert sorted(n for n, _ in places) == list(range(1, len(places) + 1)), "each option its own place in MEANING"


def test_the_helps_defaults_are_the_values_an_unset_flag_takes():
    """Each '(default VALUE' in the help is what the flag resolves to when left out (a help that says a number of its
    own goes stale when the recipe changes)."""
    unset = vars(parse("-d", "cub"))
    checked = []
    for action in config.get_args_parser()._actions:
        said = re.search(r"\(default ([^\s;:),]+)", action.help or "")  # "(default: ...)" states a rule, not a value
        if said:
            value = unset[action.dest]
            want = "off" if value is None or value is False else f"{value:g}" if isinstance(value, float) else value
            assert said.group(1) in (str(want), f"./{want}"), (action.option_strings, said.group(1), value)
            checked.append(action.dest)
    assert {"batch_size", "epochs", "momentum", "crop", "seed", "model_ema_decay"} <= set(checked)  # wd: a rule


def test_a_flags_help_and_its_recipe_value_are_one_value():
    flag = next(f for f in config.EVERY_FLAG if f.key == "batch_size")
    assert "(default 96)" in dataclasses.replace(flag, recipe=96).arguments()["help"]


def test_the_presets_name_only_flags():
    keys = {f.key for f in config.EVERY_FLAG}
    assert {name: sorted(set(p) - keys) for name, p in config.RECIPES.items()} == \
        {name: [] for name in config.RECIPES}


@pytest.mark.parametrize("flags,method", [
    (("--warmup-epochs", "5"), "linear"),  # timm's name, timm's shape (it held the lr at 1%, then jumped)
    (("--lr-warmup-epochs", "5"), "constant"),  # torchvision's name, torchvision's default
    (("--warmup-epochs", "5", "--lr-warmup-method", "constant"), "constant"),
    (("--lr-warmup-method", "constant", "--warmup-epochs", "5"), "constant"),
])
def test_timms_warmup_flag_warms_up_as_timm_does(flags, method):
    a = parse("-d", "cub", *flags)
    assert (a.lr_warmup_epochs, a.lr_warmup_method) == (5, method)


@pytest.mark.parametrize("flags,message", [
    (("--opt", "adamw", "--momentum", "0.8"), r"^--momentum 0\.8: SGD's; --opt is adamw; add --opt sgd, or leave it"),
    (("--recipe", "transformer", "--momentum", "0.8"), r"--opt is adamw \(from --recipe transformer\)"),
    (("--model-ema-decay", "0.999"), r"^--model-ema-decay 0\.999: used with --model-ema only; add --model-ema"),
    (("--recipe", "tv-v2", "--no-model-ema", "--model-ema-steps", "8"), r"^--model-ema-steps 8: used with --model-ema"),
    (("--lr-warmup-method", "linear"), r"^--lr-warmup-method linear: used with a warmup only; --lr-warmup-epochs is 0"),
    (("--recipe", "tv-v2", "--lr-warmup-epochs", "0", "--lr-warmup-decay", "0.1"), r"^--lr-warmup-decay 0\.1: used"),
    (("--wandb-group", "g"), r"^--wandb-group g: used with --wandb only; add --wandb, or leave it out"),
    (("--wandb-entity", "me"), r"^--wandb-entity me: used with --wandb only"),
])
def test_a_flag_the_run_would_not_use_is_refused(flags, message):
    """A value accepted and then ignored: a sweep over it trains the same run under several names."""
    with pytest.raises(FgicError, match=message):
        parse("-d", "cub", *flags)


@pytest.mark.parametrize("flags", [
    ("--opt", "sgd", "--momentum", "0.8"), ("--model-ema", "--model-ema-decay", "0.999"),
    ("--recipe", "tv-v2", "--model-ema-steps", "8"),  # the preset's EMA
    ("--lr-warmup-epochs", "2", "--lr-warmup-method", "linear"), ("--warmup-epochs", "0"),  # timm's: no method given
    ("--recipe", "transformer"), ("--recipe", "tv-v2"), ("--wandb", "--wandb-group", "g"),
])
def test_flags_the_run_uses_are_accepted(flags):
    parse("-d", "cub", *flags)


def test_clip_grad_norm_0_turns_a_presets_clipping_off():
    assert parse("-d", "cub", "--recipe", "transformer").clip_grad_norm == 1.0
    assert parse("-d", "cub", "--recipe", "transformer", "--clip-grad-norm", "0").clip_grad_norm is None
