import json
import re

import pytest
import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.vision_transformer import interpolate_embeddings
from torchvision.ops import StochasticDepth

from fgic import augment, data, models, weights
from fgic.errors import FgicError
from tests.helpers import PickledCode


@pytest.mark.parametrize("arch,head", [
    ("resnet18", ["fc"]), ("mobilenet_v3_small", ["classifier.3"]), ("squeezenet1_0", ["classifier.1"]),
    ("efficientnet_b0", ["classifier.1"]), ("densenet121", ["classifier"]), ("convnext_tiny", ["classifier.2"]),
    ("inception_v3", ["fc"]), ("googlenet", ["fc"]), ("vit_b_16", ["heads.head"]),
])
def test_head_is_replaced_whatever_it_is_called(arch, head):
    torch.manual_seed(0)
    model = models.construct(arch, crop=96)
    assert models.replace_head(model, 7) == head
    model.eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 96, 96))
    assert out.shape == (1, 7)


@pytest.mark.parametrize("arch,crop,hint", [
    ("vit_b_16", 100, "try --crop 96 or 112"),  # a multiple of the patch size
    ("vit_h_14", 64, "try --crop 56 or 70"),
    ("maxvit_t", 64, "try --crop 221"),  # every stage's grid divisible by the 7x7 partition
    ("inception_v3", 64, "try --crop 75"),  # too small: a 3x3 kernel meets a 2x2 map
])
def test_a_crop_the_arch_cannot_take_is_refused_with_the_crops_that_work(arch, crop, hint):
    with pytest.raises(FgicError) as exc:
        models.check_input(arch, crop)
    line = str(exc.value)
    assert line.startswith(f"--arch {arch} cannot take --crop {crop} (") and line.endswith(f"); {hint}")
    assert "\n" not in line


@pytest.mark.parametrize("arch,crop", [
    ("vit_b_16", 448), ("maxvit_t", 448), ("maxvit_t", 221), ("swin_t", 100), ("swin_v2_t", 100),
    ("inception_v3", 75), ("googlenet", 64),
    ("regnet_x_400mf", 64),  # its constructor reads tensors back, which the meta device cannot: built on the CPU
])
def test_crops_the_arch_takes_pass_the_check(arch, crop):
    models.check_input(arch, crop)


def test_a_vit_is_built_for_the_crop():
    model = models.build("vit_b_32", 5, "none", crop=96)
    assert model.image_size == 96 and model.encoder.pos_embedding.shape == (1, 1 + 3 * 3, 768)
    model.train()
    assert model(torch.zeros(2, 3, 96, 96)).shape == (2, 5)
    assert models.build("vit_b_32", 5, "none").image_size == 224  # no crop: torchvision's size (fgic.bench)


def test_the_check_falls_back_to_a_real_forward_where_the_meta_device_cannot_run_one(monkeypatch):
    class NeedsData(nn.Module):  # reads a value back, as no meta tensor can, then needs 33 px for its kernel
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 33)

        def forward(self, x):
            return self.conv(x * (x.abs().max().item() + 1))

    monkeypatch.setattr(models, "construct", lambda arch, crop=None: NeedsData())
    assert models.input_problem("resnet18", 33) is None
    assert "Kernel size can't be greater than actual input size" in models.input_problem("resnet18", 32)


def test_unknown_arch_suggests_names():
    with pytest.raises(FgicError, match="--arch resnet5: .*did you mean resnet50"):
        models.check_arch("resnet5")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch"


def test_imagenet_weights_come_from_the_torch_cache(torch_home):
    w = weights.imagenet_weights("resnet18")
    assert w.name == "IMAGENET1K_V1"  # the legacy pretrained=True weights the recipe used
    path = weights.cache_file(w)
    assert path.parent == torch_home / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    reference = tvm.resnet18(weights=None).state_dict()
    torch.save(reference, path)
    model = models.build("resnet18", 5, "imagenet")
    assert torch.equal(model.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    assert model.fc.out_features == 5


def imagenet_file(arch: str, state: dict) -> None:
    """Put `state` where fgic and torchvision look for the arch's ImageNet weights (no download)."""
    path = weights.cache_file(weights.imagenet_weights(arch))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def test_densenet_imagenet_weights_with_their_old_key_names_load(torch_home):
    """torchvision's DenseNet files name a dense layer's parts norm.1, conv.1, ... and have no num_batches_tracked (a
    file made so here, as no download is possible): loaded whole, as torchvision's own loader does."""
    torch.manual_seed(0)
    reference = tvm.densenet121(weights=None).state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in reference.items()
           if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    imagenet_file("densenet121", old)
    model = models.build("densenet121", 5, "imagenet")
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in reference.items() if not k.startswith("classifier"))


@pytest.mark.e2e  # in-process, but seconds of work (the quick loop stays under a minute)
def test_vit_imagenet_weights_get_position_embeddings_for_the_crop(torch_home, tmp_path, capsys):
    torch.manual_seed(0)
    reference = tvm.vit_b_32(weights=None).state_dict()  # 224 px: 7x7 patches of 32
    imagenet_file("vit_b_32", reference)
    model = models.build("vit_b_32", 5, "imagenet", crop=448)
    expected = interpolate_embeddings(448, 32, dict(reference))["encoder.pos_embedding"]
    assert model.encoder.pos_embedding.shape == (1, 1 + 14 * 14, 768)
    assert torch.equal(model.encoder.pos_embedding, expected)
    assert torch.equal(model.conv_proj.weight, reference["conv_proj.weight"])
    assert capsys.readouterr().err.splitlines() == [
        "fgic: notice: vit_b_32's ImageNet weights: position embeddings for 7x7 patches interpolated to 14x14 for "
        "--crop 448"]

    models.build("vit_b_32", 5, "imagenet", crop=224)  # their own size: loaded as they are, nothing said
    assert capsys.readouterr().err == ""

    torch.save(model.state_dict(), tmp_path / "tuned448.pt")  # a model fine-tuned at 448, trained on at 224
    again = models.build("vit_b_32", 5, str(tmp_path / "tuned448.pt"), crop=224)
    assert torch.equal(again.heads.head.weight, model.heads.head.weight)
    assert again.encoder.pos_embedding.shape == (1, 1 + 7 * 7, 768)
    assert "tuned448.pt: position embeddings for 14x14 patches interpolated to 7x7" in capsys.readouterr().err


@pytest.mark.parametrize("arch,aux", [("googlenet", ["aux1", "aux2"]), ("inception_v3", ["AuxLogits"])])
def test_googlenet_and_inception_use_imagenet_weights_as_torchvision_does(torch_home, arch, aux):
    """torchvision's builder, given ImageNet weights, loads them into a model with auxiliary heads and
    transform_input=True (then drops googlenet's heads; inception_v3's stay). fgic's build, without the heads, must
    compute the same features."""
    torch.manual_seed(0)
    imagenet_file(arch, tvm.get_model(arch, weights=None, aux_logits=True, init_weights=True).state_dict())
    ours = models.build(arch, 5, "imagenet")
    theirs = tvm.get_model(arch, weights="IMAGENET1K_V1")  # from the same file, in the torch cache
    assert ours.transform_input and not ours.aux_logits
    assert all(getattr(ours, name) is None for name in aux)
    ours.fc, theirs.fc = nn.Identity(), nn.Identity()  # fgic's head has 5 classes
    assert set(ours.state_dict()) == {k for k in theirs.state_dict() if not k.startswith(models.AUX_HEADS)}
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_missing_imagenet_weights_say_how_to_fetch_them(torch_home):
    with pytest.raises(FgicError, match=r"python -m fgic.weights fetch resnet18.*--weights PATH or --weights none"):
        models.build("resnet18", 5, "imagenet")


def test_named_weights_variant(torch_home):
    assert weights.imagenet_weights("resnet50", "imagenet:IMAGENET1K_V2").name == "IMAGENET1K_V2"
    with pytest.raises(FgicError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        weights.imagenet_weights("resnet50", "imagenet:V9")


def test_weights_file_whole_model_or_backbone(tmp_path):
    torch.manual_seed(1)
    tuned = tvm.resnet18(weights=None, num_classes=5)
    torch.save({"model": {"module." + k: v for k, v in tuned.state_dict().items()}}, tmp_path / "ckpt.pt")
    model = models.build("resnet18", 5, str(tmp_path / "ckpt.pt"))
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in model.state_dict().items())

    backbone = tvm.resnet18(weights=None)  # 1000 classes: the head stays fresh
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    model = models.build("resnet18", 5, str(tmp_path / "backbone.pt"))
    assert torch.equal(model.conv1.weight, backbone.conv1.weight) and model.fc.out_features == 5

    torch.save(tvm.resnet34(weights=None).state_dict(), tmp_path / "other.pt")
    with pytest.raises(FgicError, match="other.pt: does not fit --arch ResNet"):
        models.build("resnet18", 5, str(tmp_path / "other.pt"))


@pytest.mark.e2e  # in-process, but seconds of work (the quick loop stays under a minute)
def test_a_vit_file_of_another_width_is_refused_in_one_line(tmp_path):
    torch.save(tvm.vit_b_32(weights=None).state_dict(), tmp_path / "vit_b.pt")  # 768 wide, 224 px
    with pytest.raises(FgicError, match=r"vit_b\.pt: class_token has shape \(1, 1, 768\), VisionTransformer "
                                        r"needs \(1, 1, 1024\); is it a different --arch\?"):
        models.build("vit_l_32", 5, str(tmp_path / "vit_b.pt"), crop=64)


def rates(model: nn.Module) -> tuple[list[float], list[float]]:
    return ([m.p for m in model.modules() if isinstance(m, StochasticDepth)],
            sorted({m.p for m in model.modules() if type(m) is nn.Dropout}))


@pytest.mark.parametrize("arch", ["convnext_tiny", "efficientnet_b0", "swin_t", "maxvit_t"])
def test_stochastic_depth_sets_the_rate_as_torchvision_s_argument_would(arch):
    with torch.device("meta"):
        default = rates(models.construct(arch, 224))[0]
        ours = rates(models.construct(arch, 224, stochastic_depth=0.5))[0]
    # the archs' own rates: ConvNeXt-T 0.1, the others 0.2. ConvNeXt's and EfficientNet's builders take the argument,
    # Swin's and MaxViT's fix it: fgic scales their layers'
    factor = 0.5 / {"convnext_tiny": 0.1}.get(arch, 0.2)
    assert ours == pytest.approx([p * factor for p in default], abs=1e-6) and max(ours) <= 0.5 + 1e-9
    assert arch == "efficientnet_b0" or max(ours) == pytest.approx(0.5)  # the deepest block's rate


def test_dropout_sets_the_rate_and_archs_without_a_rate_are_refused():
    with torch.device("meta"):
        assert rates(models.construct("vit_b_16", 224, dropout=0.1))[1] == [0.1]
        assert rates(models.construct("efficientnet_b0", 224, dropout=0.3, stochastic_depth=0.1))[1] == [0.3]
        for arch, flag, rate in (("vit_b_16", "stochastic_depth", 0.1), ("resnet18", "stochastic_depth", 0.1),
                                 ("mobilenet_v3_small", "stochastic_depth", 0.1), ("convnext_tiny", "dropout", 0.1),
                                 ("maxvit_t", "dropout", 0.1)):
            with pytest.raises(FgicError, match=f"--{flag.replace('_', '-')}: torchvision's {arch} has no"):
                models.construct(arch, 224, **{flag: rate})


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": PickledCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(FgicError, match="evil.pt: refused"):
        models.build("resnet18", 5, str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_unreadable_files_are_named(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(tvm.resnet18(weights=None).state_dict(), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:1000])
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")  # read as pickle opcodes: garbled, not code to refuse
    for name in ("cut.pt", "text.pt", "garbage.pt"):
        with pytest.raises(FgicError, match=f"{name}: unreadable"):
            weights.read_state_dict(tmp_path / name)
    with pytest.raises(FgicError, match="nope.pt: no such file"):
        weights.read_state_dict(tmp_path / "nope.pt")


def test_batchnorm_policy_on_the_cpu():
    from fgic.syncbn import AllReduceBatchNorm
    cpu = torch.device("cpu")

    def kinds(**kw):
        return {type(m) for m in models.sync_batchnorm(tvm.resnet18(weights=None), cpu, **kw).modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds(distributed=True) == {AllReduceBatchNorm}
    assert kinds(distributed=False, same_code=True) == {AllReduceBatchNorm}  # --deterministic on one process
    assert kinds(distributed=False) == {torch.nn.BatchNorm2d}


def test_the_inputs_are_normalised_as_the_weights_were_trained(tmp_path):
    halves = augment.Normalization((0.5,) * 3, (0.5,) * 3)
    assert models.normalization("resnet50", "imagenet") == augment.IMAGENET
    assert models.normalization("efficientnet_v2_l", "imagenet") == halves  # torchvision's weights' transforms
    assert models.normalization("efficientnet_v2_l", "none") == augment.IMAGENET
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"arch": "efficientnet_v2_l", "num_classes": 3, "mean": [0.5] * 3,
                                                "std": [0.5] * 3}))
    assert models.normalization("efficientnet_v2_l", str(run / "best.pt")) == halves  # a weights file's fgic run
    (run / "config.json").write_text(json.dumps({"architectures": ["Whatever"]}))  # not fgic's
    assert models.normalization("efficientnet_v2_l", str(run / "best.pt")) == augment.IMAGENET
    spec = data.DataSpec(resize=36, crop=32, padding=4, seed=1, batch_size=2, workers=0, mean=halves.mean,
                         std=halves.std, random_erase=0.5)
    assert spec.normalization == halves and spec.extra.erase_fill == (128, 128, 128)  # zero once normalised
