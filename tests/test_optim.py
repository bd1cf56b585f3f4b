"""Parameter groups (norm and layer decay), the per-step warmup schedule and the EMA's adjusted decay."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision import models

from fgic import config, engine, optim
from fgic import models as fgic_models
from fgic.errors import FgicError
from tests.helpers import REPO, optional, run_fgic, tiny_args, train_step


def built(arch: str) -> torch.nn.Module:
    """The arch on the meta device (names and shapes only); RegNets, whose constructor reads tensors, on the CPU."""
    if arch.startswith("regnet"):
        return models.get_model(arch)
    with torch.device("meta"):
        return models.get_model(arch, **fgic_models.options(arch, None))


def scales(model: torch.nn.Module, layer_decay: float, arch: str = "the model") -> dict[str, float]:
    groups = optim.param_groups(model, 0.05, 0.0, layer_decay, arch=arch)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    return {n: scale[id(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch,count,first,last", [
    ("vit_b_16", 12, "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_11"),
    ("swin_t", 12, "features.1.0", "features.7.1"),
    ("convnext_tiny", 18, "features.1.0", "features.7.2"),
    ("resnet18", 8, "layer1.0", "layer4.1"),
])
def test_blocks_in_forward_order(arch, count, first, last):
    names = optim.blocks(built(arch))
    assert (len(names), names[0], names[-1]) == (count, first, last)


@pytest.mark.parametrize("arch", ["squeezenet1_0", "googlenet", "inception_v3", "densenet121", "vgg11", "alexnet"])
def test_an_arch_without_a_chain_of_blocks_is_refused(arch):
    with pytest.raises(FgicError, match=f"--layer-decay: {arch} has no chain of blocks to number"):
        optim.layer_ids(built(arch), arch)


# every family of the README's --layer-decay row, several sizes where the count of blocks per stage varies
@pytest.mark.parametrize("arch,count,head", [
    ("vit_b_16", 12, "heads.head"), ("swin_t", 12, "head"), ("swin_v2_t", 12, "head"),
    ("convnext_tiny", 18, "classifier.2"), ("efficientnet_b0", 16, "classifier.1"),
    ("efficientnet_v2_s", 40, "classifier.1"), ("mobilenet_v2", 17, "classifier.1"),
    ("mobilenet_v3_small", 11, "classifier.3"), ("mobilenet_v3_large", 15, "classifier.3"),
    ("regnet_y_400mf", 16, "fc"), ("regnet_x_400mf", 22, "fc"), ("regnet_y_800mf", 14, "fc"),
    ("resnet18", 8, "fc"), ("resnet50", 16, "fc"), ("resnext50_32x4d", 16, "fc"),
    ("maxvit_t", 11, "classifier.5"), ("mnasnet0_5", 16, "classifier.1"), ("shufflenet_v2_x0_5", 16, "fc"),
])
def test_each_block_is_a_layer_and_the_head_gets_the_full_rate(arch, count, head):
    model = built(arch)
    assert len(optim.blocks(model)) == count
    got = scales(model, 0.9, arch)
    heads = [n for n in got if n.startswith(f"{head}.")]
    assert heads and all(got[n] == 1.0 for n in heads)
    first = next(iter(got))
    assert got[first] == pytest.approx(0.9 ** (count + 1)) == min(got.values())  # the stem


@pytest.mark.parametrize("arch", ["regnet_y_400mf", "regnet_x_400mf"])
def test_a_regnet_is_numbered_by_its_blocks_not_its_stages(arch):
    model = built(arch)
    stages = list(model.trunk_output.named_children())
    count = sum(len(stage) for _, stage in stages)
    ids, layers = optim.layer_ids(model, arch)
    (first_stage, first), (last_stage, last) = stages[0], stages[-1]
    first_block, last_block = next(iter(first._modules)), list(last._modules)[-1]
    assert layers == count and ids["stem.0.weight"] == 0 and ids["fc.weight"] == count + 1
    assert {i for n, i in ids.items() if n.startswith(f"trunk_output.{first_stage}.{first_block}.")} == {1}
    assert {i for n, i in ids.items() if n.startswith(f"trunk_output.{last_stage}.{last_block}.")} == {count}
    assert scales(model, 0.65, arch)["fc.weight"] == 1.0  # was 0.0016 for regnet_y_400mf


def test_maxvit_is_numbered_by_its_layers():
    model = built("maxvit_t")
    ids, layers = optim.layer_ids(model, "maxvit_t")
    assert layers == sum(len(stage.layers) for stage in model.blocks) == 11
    assert ids["stem.0.0.weight"] == ids["stem.1.0.weight"] == 0  # the stem's convolutions are no blocks
    assert ids["blocks.0.layers.0.layers.MBconv.layers.conv_a.0.weight"] == 1
    assert ids["blocks.3.layers.1.layers.grid_attention.mlp_layer.3.weight"] == 11 and ids["classifier.5.weight"] == 12


@pytest.mark.parametrize("name,count,stem,head,block_0,block_last", [
    ("efficientnet_b0", 16, "conv_stem.weight", "classifier", "blocks.0.0.conv_dw.weight", "blocks.6.0.conv_pw.weight"),
    ("test_vit", 6, "cls_token", "head", "blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.weight"),
    ("test_byobnet", 4, "stem.conv.weight", "head.fc", "stages.0.0.conv1_kxk.conv.weight",
     "stages.3.0.conv1_1x1.conv.weight"),
])
def test_a_timm_model_is_numbered_by_its_group_matcher(name, count, stem, head, block_0, block_last):
    timm = optional("timm")
    model = timm.create_model(name, pretrained=False, num_classes=3)
    ids, layers = optim.layer_ids(model, f"timm:{name}")
    assert layers == count and ids[stem] == 0 and ids[block_0] == 1 and ids[block_last] == count
    got = scales(model, 0.65, f"timm:{name}")
    assert got[f"{head}.weight"] == got[f"{head}.bias"] == 1.0  # was 0.0024 for efficientnet_b0
    assert got[stem] == pytest.approx(0.65 ** (count + 1))


@pytest.mark.parametrize("arch,count,offer", [("efficientnet_v2_s", 40, "0.88"), ("resnet152", 50, "0.9")])
def test_a_layer_decay_that_would_freeze_a_deep_stem_is_refused_with_one_that_does_not(arch, count, offer):
    model = built(arch)
    with pytest.raises(FgicError, match=rf"--layer-decay 0.65: over {arch}'s {count} blocks it gives the stem "
                                        rf".* x the lr \(under 1e-05: frozen\); --layer-decay {offer} gives"):
        optim.param_groups(model, 0.05, 0.0, 0.65, arch=arch)
    stem = min(scales(model, float(offer), arch).values())
    assert optim.FROZEN_SCALE < optim.VIT_B_STEM_SCALE <= stem < 2 * optim.VIT_B_STEM_SCALE


def test_a_presets_layer_decay_that_would_freeze_says_where_it_comes_from():
    args = config.parse(["-d", "x", "--recipe", "transformer", "--arch", "resnet152", "--epochs", "9"])
    with pytest.raises(FgicError, match=r"gives the stem .*; --layer-decay 0.\d+ gives .* \(--layer-decay 0.65 comes "
                                        r"from --recipe transformer\)"):
        optim.build(built("resnet152"), torch.device("cpu"), args, 10)


def test_a_presets_layer_decay_is_turned_off_by_1_on_any_arch():
    """--recipe transformer on an arch without blocks: its layer decay is refused, and --layer-decay 1 (the lr for
    every layer) takes it away, as the refusal says (leaving the flag out gives the recipe's)."""
    args = ["-d", "x", "--recipe", "transformer", "--arch", "squeezenet1_0", "--epochs", "9"]
    with pytest.raises(FgicError, match=r"squeezenet1_0 has no chain of blocks .*; give --layer-decay 1 \(none\) "
                                        r"or leave it out \(--layer-decay 0.65 comes from --recipe transformer\)"):
        optim.build(built("squeezenet1_0"), torch.device("cpu"), config.parse(args), 10)
    opt = optim.build(built("squeezenet1_0"), torch.device("cpu"), config.parse([*args, "--layer-decay", "1"]), 10)
    assert {g["lr_scale"] for g in opt.optimizer.param_groups} == {1.0}


def test_the_help_and_the_readme_name_the_same_families():
    action = next(a for a in config.get_args_parser()._actions if "--layer-decay" in a.option_strings)
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `--layer-decay"))
    assert f"({optim.FAMILIES};" in action.help and f"({optim.FAMILIES}," in row


def test_layer_ids_of_a_vit_and_a_swin():
    ids, layers = optim.layer_ids(built("vit_b_16"), "vit_b_16")
    assert layers == 12 and ids["class_token"] == ids["conv_proj.weight"] == ids["encoder.pos_embedding"] == 0
    assert ids["encoder.layers.encoder_layer_0.ln_1.weight"] == 1 and ids["heads.head.weight"] == 13
    ids, _ = optim.layer_ids(built("swin_t"), "swin_t")
    assert ids["features.0.0.weight"] == 0 and ids["features.2.reduction.weight"] == 3  # PatchMerging: the next block
    assert ids["head.weight"] == 13


def test_groups():
    model = models.get_model("resnet18")
    default = optim.param_groups(model, 5e-4)
    assert len(default) == 1 and default[0]["params"] == list(model.parameters())
    groups = optim.param_groups(model, 5e-4, norm_weight_decay=0.0, layer_decay=0.5)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert decay[id(model.bn1.weight)] == decay[id(model.fc.bias)] == 0.0 and decay[id(model.conv1.weight)] == 5e-4
    assert scale[id(model.fc.weight)] == 1.0 and scale[id(model.conv1.weight)] == 0.5 ** 9
    assert scale[id(model.layer1[0].conv1.weight)] == 0.5 ** 8


@pytest.mark.parametrize("name, norm", [("test_efficientnet_evos", "EvoNorm2dS0"), ("convnext_atto_rms", "RmsNorm2d"),
                                        ("test_efficientnet_gn", "GroupNormAct")])
def test_timms_own_norm_layers_take_the_norm_weight_decay(name, norm):
    """timm's RmsNorm, EvoNorm and FilterResponseNorm subclass no torch norm: they are norm layers all the same."""
    timm = optional("timm")
    model = timm.create_model(name, pretrained=False, num_classes=3)
    decay = {id(p): g["weight_decay"] for g in optim.param_groups(model, 5e-4, norm_weight_decay=0.0)
             for p in g["params"]}
    weights = [m.weight for m in model.modules() if type(m).__name__ == norm]
    assert weights and all(decay[id(w)] == 0.0 for w in weights)
    assert all(decay[id(p)] == 5e-4 for p in model.parameters() if p.ndim == 4)  # the convolutions keep theirs


def test_warmup_then_cosine_per_step():
    f = optim.warmup_cosine(epochs=10, steps_per_epoch=4, warmup_epochs=2, method="linear", decay=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.55) and f(8) == 1.0
    assert f(24) == pytest.approx(0.5 * (1 + math.cos(math.pi * 16 / 32))) and f(40) == pytest.approx(0.0)
    assert optim.warmup_cosine(10, 4, 2, "constant", 0.1)(7) == pytest.approx(0.1)


def test_ema_decay_follows_torchvision_adjustment():
    assert optim.ema_decay(0.99998, 1024, 32, 600) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert optim.ema_decay(0.5, 1024, 32, 1) == 0.0


def test_the_ema_restarts_during_the_warmup():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9),
                                              use_buffers=True)
    o = optim.Optimization(opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0), False,
                           torch.amp.GradScaler("cpu", enabled=False), model, ema=ema, warmup_steps=2)
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        o.after_step()
        if step < 2:
            assert torch.equal(ema.module.weight, model.weight)  # a copy while warming up
    assert not torch.equal(ema.module.weight, model.weight)


def ema_args(**changes):
    args = config.parse(["-d", "cub", "--model-ema", "--epochs", "12"])
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def test_an_ema_longer_than_the_run_is_said_at_the_start(capsys):
    args = ema_args(batch_size=64, model_ema_steps=32, model_ema_decay=0.99998)  # digits: 252 steps an epoch
    optim.build(torch.nn.Linear(2, 2), torch.device("cpu"), args, 252)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fgic: notice: --model-ema: its horizon, 293 updates")
    assert "the 94 updates of this run (12 epochs x 252 steps / --model-ema-steps 32)" in err
    assert err.rstrip().endswith("--model-ema-decay 0.9994 gives a tenth of the run")
    assert 1 / (1 - optim.ema_decay(0.9994, 64, 32, 12)) == pytest.approx(94 / 10, rel=0.1)
    optim.build(torch.nn.Linear(2, 2), torch.device("cpu"), ema_args(batch_size=64, model_ema_decay=0.9994), 252)
    assert capsys.readouterr().err == ""


def test_the_ema_horizon_counts_the_updates_after_the_warmup():
    adjusted = optim.ema_decay(0.999, 64, 4, 12)  # a horizon of 47 updates; 12 epochs of 21 steps make 63
    assert optim.ema_horizon_notice(ema_args(batch_size=64, model_ema_steps=4), 21, adjusted) is None
    warm = ema_args(batch_size=64, model_ema_steps=4, lr_warmup_epochs=6)
    assert "is longer than the 31 updates of this run (6 epochs after the warmup x 21 steps" in \
        optim.ema_horizon_notice(warm, 21, adjusted)


@pytest.mark.e2e
def test_the_ema_notice_is_one_line_of_rank_0(tiny_data, tmp_path):
    res = run_fgic(["-d", str(tiny_data), *tiny_args(epochs=2, batch_size=12), "--model-ema", "--model-ema-steps", "1",
                    "--output-dir", str(tmp_path)], nproc=2)  # 2 steps an epoch: 4 updates
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("fgic: notice: --model-ema: its horizon, 8333 updates") == 1, res.stderr
    assert "than the 4 updates of this run (2 epochs x 2 steps / --model-ema-steps 1), so the EMA stays near its " \
           "first weights; too few updates to average: leave --model-ema out\n" in res.stderr


def test_a_runs_step_is_the_bare_step_with_its_schedule_and_ema():
    """Optimization.step (what fgic.ddp and fgic.bench take) against engine.train_step on a bare optimizer and
    scaler (the same clipping) followed by after_step: the same weights, lr and EMA, bit for bit; and the clipping
    acts (without it the weights end elsewhere)."""
    def run(stepped: bool, clip: float | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        ema = torch.optim.swa_utils.AveragedModel(model, use_buffers=True,
                                                  multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5))
        o = optim.Optimization(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1 / (1 + s)), True,
                               torch.amp.GradScaler("cpu", enabled=False), model, clip, ema, warmup_steps=1)
        criterion = torch.nn.CrossEntropyLoss()
        cpu = torch.device("cpu")
        for _ in range(4):
            images, labels = torch.randn(5, 6) * 10, torch.randint(0, 3, (5,))
            if stepped:
                o.step(engine.forward(model, images, labels, criterion, cpu, "off")[0])
            else:
                train_step(model, images, labels, sgd, o.scaler, criterion, cpu, "off", clip)
                o.after_step()
        assert o.steps == 4 and o.lr == pytest.approx(0.5 / 5)
        return [p.detach() for p in (*model.parameters(), *ema.module.parameters())]

    for a, b in zip(run(True, 0.1), run(False, 0.1), strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(run(True, 0.1), run(True, None)))


def swin_with_ema(decay: float):
    """A small Swin (swin_t's layers at 1/6 of its width and depth) and its EMA."""
    torch.manual_seed(0)
    model = models.swin_transformer.SwinTransformer([4, 4], 16, [1, 1], [1, 1], [7, 7], num_classes=3)
    return model, torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=optim.ema_average(decay), use_buffers=True)


def test_the_ema_copies_integer_buffers_and_averages_the_rest():
    """Swin's relative_position_index: torch's EMA function averaged it in float and truncated (55 -> 54 at the
    tv-v2 preset's adjusted decay), so the EMA model read other bias-table entries."""
    model, ema = swin_with_ema(0.968)
    for _ in range(2):  # an unchanged model: its EMA is itself, bit for bit
        ema.update_parameters(model)
    assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    index = "features.1.0.attn.relative_position_index"
    assert torch.equal(ema.module.state_dict()[index], model.state_dict()[index])
    weight = "head.weight"
    assert torch.allclose(ema.module.state_dict()[weight], model.state_dict()[weight] - 0.968, atol=1e-6)


def test_an_ema_saved_with_truncated_indices_is_loaded_with_the_models():
    """Checkpoints written before ema_average: their EMA's index buffers come back as the model's, on resume,
    --eval-only --model-ema and fgic.predict."""
    model, ema = swin_with_ema(0.968)
    index = "module.features.1.0.attn.relative_position_index"
    broken = {**ema.state_dict(), index: ema.state_dict()[index] - (ema.state_dict()[index] % 7 == 5).long()}
    assert not torch.equal(broken[index], model.state_dict()[index[len("module."):]])
    repaired = optim.exact_buffers(broken, model.state_dict(), optim.EMA_PREFIX)
    assert torch.equal(repaired[index], model.state_dict()[index[len("module."):]])
    assert repaired["module.head.weight"] is broken["module.head.weight"] and "n_averaged" in repaired
