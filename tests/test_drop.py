"""fgic.drop: stochastic depth and dropout masks keyed per sample, the same for a sample in any batch."""
import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import models as tvm
from torchvision.ops import StochasticDepth

from fgic import augment, drop, models
from fgic.errors import FgicError
from tests.helpers import optional

KEYS = torch.tensor([augment.drop_key(2020, 0, i) for i in range(4000)])


def old_keyed_drop(x: torch.Tensor, keys: torch.Tensor, layer: int, p: float, mode: str) -> torch.Tensor:
    """KeyedDrop's forward before its masks were made in int32 blocks (int64 over the whole input): the reference
    for the bits."""
    m32, mult = 0xFFFFFFFF, 0x45D9F3B

    def mix32(v):
        v = ((v >> 16) ^ v) * mult & m32
        v = ((v >> 16) ^ v) * mult & m32
        return (v >> 16) ^ v

    per_sample = 1 if mode == "row" else x[0].numel()
    base = mix32(keys.to(torch.int64) ^ mix32(layer))
    column = mix32(torch.arange(per_sample, device=keys.device, dtype=torch.int64))
    keep = (mix32((base[:, None] + column) & m32) >> 8).to(torch.float32) * 2.0 ** -24 >= p
    scale = keep.to(x.dtype) / (1.0 - p) if p < 1.0 else keep.to(x.dtype)
    shape = (len(x), *[1] * (x.dim() - 1)) if mode == "row" else x.shape
    return x * scale.view(shape)


def masks(layer: drop.KeyedDrop, keys: torch.Tensor, shape=(1,)) -> torch.Tensor:
    """Which elements the layer keeps, for an input of ones."""
    layer.train()
    with drop.keyed(layer, keys):
        return layer(torch.ones(len(keys), *shape, device=keys.device)) != 0


@pytest.mark.parametrize("mode,shape", [("row", (3, 2, 2)), ("element", (5, 7))])
def test_a_samples_mask_does_not_depend_on_its_batch(mode, shape):
    layer = drop.KeyedDrop(0.4, mode, layer=3)
    whole = masks(layer, KEYS[:64], shape)
    for part in (KEYS[32:64], KEYS[[5, 60, 2]], KEYS[7:8]):  # another process's share, another order, one sample
        rows = [int(torch.nonzero(KEYS[:64] == k)) for k in part]
        assert torch.equal(masks(layer, part, shape), whole[rows])
    if mode == "row":
        assert all(m.all() or not m.any() for m in whole)  # a whole sample, kept or dropped
    else:
        assert len({tuple(m.flatten().tolist()) for m in whole}) == len(whole)  # elements apart, samples apart


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_the_rate_and_the_scale_are_torchs(p):
    layer = drop.KeyedDrop(p, "element", layer=0)
    layer.train()
    x = torch.rand(len(KEYS), 16)
    with drop.keyed(layer, KEYS):
        y = layer(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.005  # 64,000 draws: 5 standard deviations at most
    assert torch.allclose(y[kept], x[kept] / (1 - p))


def test_layers_and_epochs_draw_apart():
    p = 0.5
    a, b = masks(drop.KeyedDrop(p, "row", 0), KEYS), masks(drop.KeyedDrop(p, "row", 1), KEYS)
    later = masks(drop.KeyedDrop(p, "row", 0), torch.tensor([augment.drop_key(2020, 1, i) for i in range(len(KEYS))]))
    for other in (b, later):
        assert abs((a == other).float().mean().item() - (p * p + (1 - p) * (1 - p))) < 0.03  # as independent draws


def test_eval_mode_and_p0_pass_through():
    x = torch.randn(4, 3)
    assert drop.KeyedDrop(0.5, "row", 0).eval()(x) is x  # no keys needed
    assert drop.KeyedDrop(0.0, "element", 0).train()(x) is x


def test_training_without_keys_says_so():
    layer = drop.KeyedDrop(0.2, "row", 5).train()
    with pytest.raises(RuntimeError, match="drop.keyed"):
        layer(torch.ones(2, 3))
    with drop.keyed(layer, KEYS[:2]), pytest.raises(RuntimeError, match="3 rows for a batch of 2: a dropout not"):
        layer(torch.ones(3, 3))


@pytest.mark.parametrize("arch", ["convnext_tiny", "efficientnet_b0", "swin_t", "vgg11", "mobilenet_v3_small"])
def test_replace_takes_every_stochastic_depth_and_dropout(arch):
    model = tvm.get_model(arch, num_classes=3)
    before = [type(m) for m in model.modules() if isinstance(m, StochasticDepth) or type(m) is nn.Dropout]
    assert drop.replace(model) == len(before) > 0
    assert not any(isinstance(m, StochasticDepth) or type(m) is nn.Dropout for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, drop.KeyedDrop)]
    assert [m.layer for m in layers] == list(range(len(layers)))
    assert [m.mode for m in layers] == ["row" if t is StochasticDepth else "element" for t in before]


def test_a_sample_trains_through_the_same_masks_in_any_batch():
    """A ConvNeXt (LayerNorm: no batch statistics) in training mode with a high stochastic depth rate: a sample's
    output is the same computed with the whole batch, with half of it, or alone. Its blocks' layer scale at 1, not
    1e-6: a dropped block changes the output."""
    torch.manual_seed(0)
    model = tvm.convnext_tiny(num_classes=3, stochastic_depth_prob=0.6, layer_scale=1.0)
    drop.replace(model)
    model.train()
    images = torch.randn(4, 3, 32, 32)
    with drop.keyed(model, KEYS[:4]):
        whole = model(images)
    with drop.keyed(model, KEYS[2:4]):
        half = model(images[2:])
    with drop.keyed(model, KEYS[3:4]):
        alone = model(images[3:])
    torch.testing.assert_close(half, whole[2:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, whole[3:], rtol=1e-5, atol=1e-6)
    with drop.keyed(model, KEYS[4:8]):  # other samples' masks: another output for the same images
        assert not torch.allclose(model(images), whole, rtol=1e-3, atol=1e-4)


EDGE_KEYS = torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFF0000, 0x0000FFFF])  # the int32 sign


@pytest.mark.parametrize("mode,shape,dtype,p,block", [
    ("element", (5, 7), torch.float32, 0.1, None),
    ("element", (3, 2, 150_001), torch.float32, 0.7, None),  # 3 column blocks of a sample, the last a short one
    ("element", (700, 999), torch.bfloat16, 0.3, None),  # blocks of 262 rows
    ("element", (13, 3, 5), torch.float16, 0.5, 8),  # blocks of 1 row x 8 columns, then 1 row x 7
    ("element", (9, 11), torch.float64, 1.0, 32),  # blocks of 2 rows, the last of 1
    ("row", (3, 4), torch.float32, 0.2, 2),
])
def test_the_masks_and_outputs_are_the_old_implementations_bits(monkeypatch, mode, shape, dtype, p, block):
    if block is not None:
        monkeypatch.setattr(drop, "BLOCK", block)
    keys = torch.cat([EDGE_KEYS, KEYS])[:shape[0]]
    x = torch.randn(*shape, dtype=torch.float64).to(dtype) + 3.0  # no zero before the mask
    layer = drop.KeyedDrop(p, mode, layer=11).train()
    with drop.keyed(layer, keys):
        y = layer(x)
    reference = old_keyed_drop(x, keys, 11, p, mode)
    assert y.dtype == reference.dtype and torch.equal(y, reference)
    assert torch.equal(y != 0, reference != 0)


@pytest.mark.e2e  # in-process, but seconds of work (the quick loop stays under a minute)
def test_compiled_masks_on_the_cpu_are_eagers_blocks():
    """torch.compile makes the masks in one piece, eager on the CPU in blocks: the same bits. Swin's attention, keyed
    by a forward hook, traces with its dropout (aot_eager: dynamo's graph, no C++ build)."""
    torch._dynamo.reset()
    keys = torch.cat([EDGE_KEYS[:3], KEYS[:3]])
    layer = drop.KeyedDrop(0.3, "element", layer=7)
    model = nn.Sequential(nn.LayerNorm(5), layer).train()
    x = torch.randn(6, 60_000, 5) + 3.0  # 300,000 elements a sample: 2 column blocks
    attention = tvm.swin_transformer.ShiftedWindowAttention(8, [2, 2], [1, 1], num_heads=2, dropout=0.3)
    drop.replace(attention)
    attention.train()
    tokens = torch.randn(6, 4, 4, 8)
    with drop.keyed(model, keys), drop.keyed(attention, keys), torch.no_grad():
        kept = torch.compile(model)(x) != 0
        assert torch.equal(kept, model(x) != 0)
        assert torch.equal(kept, old_keyed_drop(torch.ones(6, 300_000), keys, 7, 0.3, "element").view(x.shape) != 0)
        ours = torch.compile(attention, backend="aot_eager")(tokens)
        torch.testing.assert_close(ours, attention(tokens), rtol=0, atol=0)
        attention.keyed_dropout.p = 0.0
        assert not torch.allclose(attention(tokens), ours)  # the compiled attention dropped


class Temporaries(TorchDispatchMode):
    """The most bytes that the storages created by operators inside held at once (each counted until freed)."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[StorageWeakRef, int, int]] = []
        self.alive: list[list[tuple[int, int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        known = {t.untyped_storage()._cdata for t in tensors} | {c for r, _, c in self.made if not r.expired()}
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in known:
                storage = t.untyped_storage()
                self.made.append((StorageWeakRef(storage), storage.nbytes(), storage._cdata))
                known.add(storage._cdata)
        self.alive.append([(c, n) for r, n, c in self.made if not r.expired()])
        return out

    def peak(self, besides: torch.Tensor) -> int:
        result = besides.untyped_storage()._cdata
        return max(sum(n for c, n in step if c != result) for step in self.alive)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_masks_temporaries_stay_within_twice_the_inputs_bytes(dtype):
    """ViT-S/16's tokens for 64 samples (4.8 M elements): the int64 hash over the whole input kept 117 MB alive for
    a 19 MB float32 input. The output itself is not counted."""
    x = torch.randn(64, 197, 384, dtype=dtype)
    layer = drop.KeyedDrop(0.1, "element", layer=3).train()
    with drop.keyed(layer, KEYS[:64]), Temporaries() as temporaries:
        y = layer(x)
    assert 0 < temporaries.peak(besides=y) <= 2 * x.nbytes


class RandomOps(TorchDispatchMode):
    """Records the operators that draw from torch's generators (dropout's bernoulli, rand...)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def with_dropout_on_meta(arch: str, rate: float) -> nn.Module | None:
    """fgic's build of `arch` with --dropout `rate`, keyed, in training mode on the meta device; None where fgic
    refuses --dropout for it. RegNets compute widths from tensors while building: models.EmptyOnMeta for them."""
    try:
        try:
            with torch.device("meta"):
                model = models.construct(arch, 224, dropout=rate)
        except NotImplementedError:
            with models.EmptyOnMeta():
                model = models.construct(arch, 224, dropout=rate).to("meta")
    except FgicError:
        return None
    drop.replace(model)
    return model.train()


@pytest.mark.e2e  # in-process, but seconds of work (the quick loop stays under a minute)
def test_no_training_forward_with_dropout_draws_from_torchs_generator():
    """Every torchvision arch that takes --dropout: a training forward with keys uses no random operator, so no
    dropout escaped KeyedDrop (torchvision's Swin attention applies its output dropout with F.dropout)."""
    drawing, taken = {}, []
    for arch in tvm.list_models(module=tvm):
        model = with_dropout_on_meta(arch, 0.2)
        if model is None:
            continue
        taken.append(arch)
        with drop.keyed(model, KEYS[:2].to("meta")), RandomOps() as random_ops:
            model(torch.zeros(2, 3, 224, 224, device="meta"))
        if random_ops.ops:
            drawing[arch] = sorted(random_ops.ops)
    assert drawing == {}
    assert {"swin_t", "swin_v2_t", "vit_b_16", "efficientnet_b0", "vgg11", "alexnet"} <= set(taken)


@pytest.mark.parametrize("arch", ["swin_t", "swin_v2_t", "vit_b_32", "squeezenet1_1", "timm:test_vit"])
def test_a_samples_training_output_with_dropout_is_its_keys(arch):
    """fgic's build with --dropout 0.2 in training mode (archs without BatchNorm: no batch statistics): a sample's
    output is the same under another torch.manual_seed and alone as in a batch of 2; other keys change it."""
    if arch.startswith("timm:"):
        optional("timm")
    torch.manual_seed(0)
    model = models.build(arch, 3, "none", crop=64, dropout=0.2).train()
    images = torch.randn(2, 3, 64, 64)
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with drop.keyed(model, KEYS[:2]), torch.no_grad():
            outputs.append(model(images))
    with drop.keyed(model, KEYS[1:2]), torch.no_grad():
        alone = model(images[1:])
    with drop.keyed(model, KEYS[2:4]), torch.no_grad():
        others = model(images)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(alone, outputs[0][1:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(others, outputs[0], rtol=1e-3, atol=1e-4)


def test_swins_attention_dropout_is_keyed_without_a_state_dict_entry():
    model = tvm.swin_t(num_classes=3, dropout=0.3)
    names = list(model.state_dict())
    attentions = [m for m in model.modules() if isinstance(m, tvm.swin_transformer.ShiftedWindowAttention)]
    drop.replace(model)
    assert list(model.state_dict()) == names
    assert all(m.dropout == 0.0 and m.keyed_dropout.p == 0.3 for m in attentions)
    layers = [m for m in model.modules() if isinstance(m, drop.KeyedDrop)]
    assert [m.layer for m in layers] == list(range(len(layers)))
    with pytest.raises(ValueError, match="attention_dropout"):
        drop.replace(tvm.swin_t(num_classes=3, attention_dropout=0.1))


def test_batch_mode_stochastic_depth_is_refused():
    model = nn.Sequential(nn.Linear(2, 2), StochasticDepth(0.1, "batch"))
    with pytest.raises(ValueError, match="'batch' mode"):
        drop.replace(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_masks_on_a_gpu_are_the_cpus():
    for mode in ("row", "element"):
        layer = drop.KeyedDrop(0.3, mode, layer=7)
        assert torch.equal(masks(layer.cuda(), KEYS[:256].cuda(), (4, 9)).cpu(), masks(layer.cpu(), KEYS[:256], (4, 9)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode,shape", [("row", (197, 768)), ("element", (197, 768))])
def test_compiled_masks_on_a_gpu_are_the_cpus(mode, shape):
    """ViT-B/16's token shape with a LayerNorm in front, the fusion that once made inductor fold the column counter
    into an int32 index expression (a Triton build error; a smaller constant would overflow silently)."""
    torch._dynamo.reset()
    layer = drop.KeyedDrop(0.3, mode, layer=7)
    model = nn.Sequential(nn.LayerNorm(shape[-1]), layer).cuda().train()
    x = torch.randn(8, *shape, device="cuda") + 3.0  # no zero before the mask
    with drop.keyed(model, KEYS[:8].cuda()):
        kept = torch.compile(model)(x) != 0
    assert torch.equal(kept.cpu(), masks(layer.cpu(), KEYS[:8], shape))
