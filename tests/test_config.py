import pytest
import torch

from fgic import config, engine
from fgic.errors import FgicError


def parse(*argv):
    return config.resolve(config.get_args_parser().parse_args(list(argv)))


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
    (("--crop", "600"), "--crop"),
    (("--label-smoothing", "1.5"), "--label-smoothing"),
    (("-w", "-1"), "-w/--workers"),
    (("--lr-warmup-epochs", "128"), "--lr-warmup-epochs"),
    (("--recipe", "tv-v2", "--epochs", "5"), "--lr-warmup-epochs 5: must be fewer than --epochs 5"),
    (("--random-erase", "1.5"), "--random-erase"),
    (("--mixup-alpha", "-1"), "--mixup-alpha"),
    (("--layer-decay", "0"), "--layer-decay"),
    (("--model-ema-decay", "1.5"), "--model-ema-decay"),
    (("--model-ema-steps", "0"), "--model-ema-steps"),
    (("--clip-grad-norm", "0"), "--clip-grad-norm"),
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
    assert a.recipe == "seed" and {k: getattr(a, k) for k in config.LATER} == config.LATER
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


def test_configs_from_before_the_later_options_read_as_the_seed_recipe():
    old = {k: v for k, v in vars(parse("-d", "cub")).items() if k not in config.LATER}
    assert config.completed(old) == vars(parse("-d", "cub"))
