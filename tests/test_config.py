import pytest

from fgic import config
from fgic.errors import FgicError


def parse(*argv):
    return config.resolve(config.get_args_parser().parse_args(list(argv)))


def test_recipe_defaults():
    a = parse("-d", "cub")
    assert (a.arch, a.weights, a.batch_size, a.epochs, a.resize, a.crop, a.padding) == \
        ("resnet50", "imagenet", 64, 128, 512, 448, 8)
    assert (a.momentum, a.weight_decay, a.label_smoothing, a.seed, a.amp, a.resume) == \
        (0.9, 5e-4, 0.1, 2020, "off", "auto")
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
])
def test_bad_values_name_the_flag(argv, flag):
    data = () if not argv else ("-d", "cub")
    with pytest.raises(FgicError, match=flag):
        parse(*data, *argv)


def test_run_name_is_stable_and_shows_arch_amp_seed_note():
    assert config.run_name(parse("-d", "cub")) == "resnet50-off-s2020"
    assert config.run_name(parse("-d", "cub", "-a", "bf16", "-s", "1", "-n", "lr.2")) == "resnet50-bf16-s1-lr.2"


def test_parser_is_reusable_as_a_parent():
    import argparse
    p = argparse.ArgumentParser(parents=[config.get_args_parser(add_help=False)])
    p.add_argument("--seeds", nargs="+", type=int)
    a = p.parse_args(["-d", "cub", "--seeds", "0", "1"])
    assert a.seeds == [0, 1] and a.data == "cub"
