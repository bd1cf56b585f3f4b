"""timm backbones (fgic.timm_models): building, keyed DropPath and dropout, refusals, pretrained weights from a local
Hugging Face cache, the offline message, `fgic.weights fetch/path timm:NAME`, BatchNormAct2d on several processes."""
from __future__ import annotations

import socket
import sys

import pytest
import torch

from fgic import augment, ddp, drop, models, syncbn, timm_models, trained, weights
from fgic.errors import FgicError
from fgic.jsonfile import read_object
from tests.helpers import optional, tiny_args


@pytest.fixture
def timm():
    return optional("timm")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own; put(repo, state) files a model.safetensors there as
    hf_hub_download would (refs/main -> snapshots/SHA)."""
    from huggingface_hub import constants
    from safetensors.torch import save_file
    root = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(root))

    def put(repo: str, state: dict) -> None:
        folder = root / "hub" / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / ("0" * 40) /
                                                                    "model.safetensors"))
    return put


def test_a_timm_model_is_built_for_the_crop_with_its_rates_keyed(timm):
    model = models.build("timm:test_vit", 3, "none", crop=64, stochastic_depth=0.2, dropout=0.1)
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 64) and model.head.out_features == 3
    keyed = [m for m in model.modules() if isinstance(m, drop.KeyedDrop) and m.p > 0]
    assert not any(type(m).__name__ == "DropPath" for m in model.modules())
    assert max(m.p for m in keyed if m.mode == "row") == pytest.approx(0.2)  # timm's ramp: the deepest at the rate
    assert [m.p for m in keyed if m.mode == "element"] == [0.1]  # head_drop
    # a sample's masks are its own: the same output alone as in a batch with others (LayerNorm: no batch statistics)
    torch.manual_seed(0)
    x, keys = torch.randn(4, 3, 64, 64), torch.tensor([11, 22, 33, 44])
    model.train()
    with drop.keyed(model, keys):
        together = model(x)
    with drop.keyed(model, keys[2:]):
        alone = model(x[2:])
    torch.testing.assert_close(alone, together[2:], rtol=1e-5, atol=1e-6)
    with drop.keyed(model, keys + 1):
        assert not torch.allclose(model(x), together)  # the masks do depend on the keys


def test_a_cnn_without_img_size_is_built_at_any_crop(timm):
    model = models.build("timm:test_byobnet", 3, "none", crop=96, stochastic_depth=0.1)
    assert sum(isinstance(m, drop.KeyedDrop) and m.mode == "row" for m in model.modules()) == 3  # its DropPaths
    model.eval()
    assert model(torch.zeros(1, 3, 96, 96)).shape == (1, 3)


@pytest.mark.parametrize("arch,kwargs,line", [
    ("timm:resnet18", {"dropout": 0.1}, "--dropout: timm's resnet18 has no dropout layer at that rate (its dropout, if "
                                        "any, is a function fgic cannot key per sample); leave it out"),
    ("timm:test_vit.r160_in1k", {}, "--arch timm:test_vit.r160_in1k: give the architecture without its tag; the tag "
                                    "goes in --weights imagenet:r160_in1k"),
    ("timm:resnt18", {}, "--arch timm:resnt18: not a timm model; did you mean timm:resnet18, timm:resnet18d, "
                         "timm:skresnet18?"),
])
def test_what_timm_cannot_build_gets_one_line(timm, arch, kwargs, line):
    with pytest.raises(FgicError) as exc:
        models.build(arch, 3, "none", crop=64, **kwargs)
    assert str(exc.value) == line


def test_without_timm_the_line_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(FgicError, match=r"^--arch timm:NAME needs the optional extra timm: pip install timm"):
        models.check_arch("timm:resnet18")


def test_a_crop_a_timm_vit_cannot_take_is_refused(timm):
    with pytest.raises(FgicError, match=r"^--arch timm:test_vit cannot take --crop 65 \(.*\); try --crop 64 or 80$"):
        models.check_input("timm:test_vit", 65)


def test_imagenet_weights_load_from_the_hub_cache_resampled_and_with_a_new_head(timm, hf_cache, capsys):
    from timm.layers import resample_abs_pos_embed
    torch.manual_seed(1)
    source = timm.create_model("test_vit")  # built at 160 px as its tag r160_in1k: a 10 x 10 grid, 1000 classes
    hf_cache("timm/test_vit.r160_in1k", source.state_dict())
    model = models.build("timm:test_vit", 3, "imagenet", crop=64)
    assert capsys.readouterr().err == ("fgic: notice: timm:test_vit.r160_in1k's weights: head (head) new for 3 "
                                       "classes; resampled pos_embed (1, 101, 64) -> (1, 17, 64)\n")
    want = resample_abs_pos_embed(source.pos_embed.detach(), (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), want)
    theirs = source.state_dict()
    for key, value in model.state_dict().items():
        if key != "pos_embed" and not key.startswith("head."):
            assert torch.equal(value, theirs[key]), key
    assert model.head.weight.shape == (3, 64) and "state_dict" not in model.pretrained_cfg
    assert models.build("timm:test_vit", 3, "imagenet:r160_in1k", crop=64).pos_embed.shape == (1, 17, 64)


def test_uncached_weights_without_internet_get_the_fetch_line_at_once(timm, hf_cache, monkeypatch):
    def unreachable(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(timm_models.socket, "create_connection", unreachable)
    with pytest.raises(FgicError) as exc:
        models.build("timm:test_byobnet", 3, "imagenet", crop=64)
    hub = timm_models.cache_path("timm:test_byobnet")[1]
    assert str(exc.value) == (f"--weights imagenet: timm:test_byobnet.r160_in1k's weights are not in {hub} and could "
                              f"not be downloaded (gaierror); on a machine with internet run `python -m fgic.weights "
                              f"fetch timm:test_byobnet.r160_in1k`, or pass --weights PATH or --weights none")
    with pytest.raises(FgicError, match=r"^--weights imagenet:bogus: timm's test_vit has the tags r160_in1k "):
        models.build("timm:test_vit", 3, "imagenet:bogus", crop=64)


def test_fgic_weights_path_and_fetch_name_the_hub_cache(timm, hf_cache, monkeypatch, capsys):
    monkeypatch.setattr(timm_models.socket, "create_connection", lambda *a, **k: pytest.fail("went online"))
    hf_cache("timm/test_vit.r160_in1k", timm.create_model("test_vit").state_dict())
    assert weights.main(["path", "timm:test_vit", "timm:test_byobnet.r160_in1k"]) == 0
    present, missing = capsys.readouterr().out.splitlines()
    assert present.startswith("timm:test_vit: ") and present.endswith("/model.safetensors (present)")
    assert missing == f"timm:test_byobnet.r160_in1k: {timm_models.cache_path('timm:test_byobnet')[1]} (missing)"
    assert weights.main(["fetch", "timm:test_vit.r160_in1k"]) == 0  # cached: no download
    assert capsys.readouterr().out == present.replace(" (present)", "").replace("timm:test_vit:",
                                                                                "timm:test_vit.r160_in1k:") + "\n"


def test_timms_weights_bring_their_own_normalisation(timm):
    """From timm's pretrained configs alone (nothing fetched): a third of its default tags are not ImageNet's."""
    halves = augment.Normalization((0.5,) * 3, (0.5,) * 3)
    assert models.normalization("timm:vit_base_patch16_224", "imagenet") == halves  # augreg2_in21k_ft_in1k
    assert models.normalization("timm:vit_base_patch16_224", "none") == augment.IMAGENET  # from scratch
    assert models.normalization("timm:convnext_tiny", "imagenet") == augment.IMAGENET
    clip = models.normalization("timm:eva02_base_patch14_224", "imagenet")
    assert clip.mean == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-4)
    with pytest.raises(FgicError, match="--weights imagenet:nope: timm's convnext_tiny has the tags"):
        models.normalization("timm:convnext_tiny", "imagenet:nope")


@pytest.mark.e2e  # in-process, but seconds of work (the quick loop stays under a minute)
def test_a_run_normalises_its_inputs_as_its_weights_were_trained(timm, hf_cache, tiny_data, tmp_path, monkeypatch,
                                                                 capsys):
    """timm's test_vit.r160_in1k takes (x - 0.5) / 0.5, as most of timm's ViTs: training, evaluation, predict and
    export use that, config.json records it, and scoring its checkpoint with other statistics is refused."""
    hf_cache("timm/test_vit.r160_in1k", timm.create_model("test_vit").state_dict())
    used = []
    real = augment.normalize
    monkeypatch.setattr(augment, "normalize", lambda batch, norm: used.append(norm) or real(batch, norm))
    argv = ["-d", str(tiny_data), *tiny_args(arch="timm:test_vit", weights="imagenet", resize=36, crop=32,
                                             epochs=1), "--output-dir", str(tmp_path / "runs")]
    try:
        assert ddp.main(argv) == 0
        halves = augment.Normalization((0.5,) * 3, (0.5,) * 3)
        assert used and set(used) == {halves}  # every training and test batch
        assert "inputs normalised by --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5" in capsys.readouterr().out
        [run_dir] = (tmp_path / "runs").glob("*/*")
        assert (read_object(run_dir / "config.json")["mean"], read_object(run_dir / "config.json")["std"]) == \
            ([0.5] * 3, [0.5] * 3)
        run = trained.load(str(run_dir))
        assert run.normalization == halves and run.preprocessing()["mean"] == [0.5] * 3
        with pytest.raises(FgicError) as refused:
            ddp.main([*argv, "--eval-only", "--weights", "none"])
        assert str(refused.value).endswith(": trained with --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5, these flags give "
                                           "--mean 0.485 0.456 0.406 --std 0.229 0.224 0.225; give --mean 0.5 0.5 0.5 "
                                           "--std 0.5 0.5 0.5")
        with pytest.raises(FgicError, match=r"--mean: \[0.5, 0.5, 0.5\] -> \[0.4, 0.5, 0.5\]\); .*--output-dir; "
                                             r"--mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 continues it$"):
            ddp.main([*argv, "--mean", "0.4", "0.5", "0.5"])
    finally:
        torch.use_deterministic_algorithms(False)


def test_batchnorm_with_its_activation_is_synchronised_with_the_activation(timm):
    """timm's BatchNormAct2d (norm, dropout, activation in one module) becomes AllReduceBatchNormAct, whose outputs
    and running statistics are the original's, on the CPU path that 1 and N processes take."""
    from timm.layers import BatchNormAct2d
    torch.manual_seed(0)
    original = BatchNormAct2d(4, act_layer=torch.nn.ReLU)
    converted = syncbn.convert_sync_batchnorm(BatchNormAct2d(4, act_layer=torch.nn.ReLU), "cpu")
    assert type(converted) is syncbn.AllReduceBatchNormAct
    x = torch.randn(6, 4, 5, 5)
    out = converted(x)
    torch.testing.assert_close(out, original(x))
    assert (out >= 0).all() and (out == 0).any()  # the activation ran
    torch.testing.assert_close(converted.running_mean, original.running_mean)
    torch.testing.assert_close(converted.running_var, original.running_var)
    converted.eval(), original.eval()
    torch.testing.assert_close(converted(x), original(x))


def test_a_batchnorm_subclass_of_unknown_forward_is_refused():
    class Odd(torch.nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2
    with pytest.raises(FgicError, match=r"^Odd: a BatchNorm subclass fgic cannot synchronise across processes"):
        syncbn.convert_sync_batchnorm(torch.nn.Sequential(Odd(3)), "cpu")
