import pytest
import torch
from torchvision import models as tvm

from fgic import models, weights
from fgic.errors import FgicError
from tests.conftest import PickledCode


@pytest.mark.parametrize("arch,head", [
    ("resnet18", ["fc"]), ("mobilenet_v3_small", ["classifier.3"]), ("squeezenet1_0", ["classifier.1"]),
    ("efficientnet_b0", ["classifier.1"]), ("densenet121", ["classifier"]), ("convnext_tiny", ["classifier.2"]),
    ("inception_v3", ["AuxLogits.fc", "fc"]), ("vit_b_16", ["heads.head"]),
])
def test_head_is_replaced_whatever_it_is_called(arch, head):
    torch.manual_seed(0)
    model = tvm.get_model(arch, weights=None)
    assert models.replace_head(model, 7) == head
    model.eval()
    size = 224 if arch == "vit_b_16" else 96
    with torch.inference_mode():
        out = models.logits(model(torch.zeros(1, 3, size, size)))
    assert out.shape == (1, 7)


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
