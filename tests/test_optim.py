"""Parameter groups (norm and layer decay), the per-step warmup schedule and the EMA's adjusted decay."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision import models

from fgic import optim
from fgic.errors import FgicError


@pytest.mark.parametrize("arch,count,first,last", [
    ("vit_b_16", 12, "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_11"),
    ("swin_t", 12, "features.1.0", "features.7.1"),
    ("convnext_tiny", 18, "features.1.0", "features.7.2"),
    ("resnet18", 8, "layer1.0", "layer4.1"),
])
def test_blocks_in_forward_order(arch, count, first, last):
    names = optim.blocks(models.get_model(arch))
    assert (len(names), names[0], names[-1]) == (count, first, last)


def test_an_arch_without_blocks_is_refused():
    with pytest.raises(FgicError, match="--layer-decay: squeezenet1_0"):
        optim.layer_ids(models.get_model("squeezenet1_0"), "squeezenet1_0")


def test_layer_ids_of_a_vit_and_a_swin():
    ids, layers = optim.layer_ids(models.get_model("vit_b_16"), "vit_b_16")
    assert layers == 12 and ids["class_token"] == ids["conv_proj.weight"] == ids["encoder.pos_embedding"] == 0
    assert ids["encoder.layers.encoder_layer_0.ln_1.weight"] == 1 and ids["heads.head.weight"] == 13
    ids, _ = optim.layer_ids(models.get_model("swin_t"), "swin_t")
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
