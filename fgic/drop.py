"""Stochastic depth and dropout whose masks are a function of (seed, epoch, sample index, layer), like the
augmentation: 1 process and N draw the same masks for a sample, and a resumed run the ones the uninterrupted run drew.
torch's own draw from each process's generator, in batch order, so they depend on the layout and on the RNG state.

`replace(model)` swaps torchvision's StochasticDepth ("row" mode), timm's DropPath and nn.Dropout for KeyedDrop at
build time, and keys the output dropout that torchvision's Swin attention applies as a function; the training step
hands each batch's sample keys (augment.drop_key, carried by the batch) to them with `keyed(model, keys)`.

The mask of a sample comes from a counter-based integer hash, not a generator: integer arithmetic gives the same bits
on the CPU and on a GPU, for any batch composition, and costs a few elementwise ops."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention
from torchvision.ops import StochasticDepth

M32 = 0xFFFFFFFF
MULT = 0x45D9F3B  # the multiplier of a well-studied 32-bit integer mix; below 2**27, so products stay in int64
# On the CPU outside torch.compile the masks are made in blocks of this many elements (1 MB of int32), so that the
# hash's temporaries are a block's, not the input's (int64 over the whole input: 117 MB alive at once, 592 MB
# allocated, for a 19 MB input), and the block stays in the cache through its dozen passes.
BLOCK = 1 << 18


def mix32(x):
    """A bijective mix of 32-bit values: Python ints, or int64 tensors (exact on every device: no float, no
    overflow)."""
    x = ((x >> 16) ^ x) * MULT & M32
    x = ((x >> 16) ^ x) * MULT & M32
    return (x >> 16) ^ x


def mix32_(x: torch.Tensor) -> torch.Tensor:
    """mix32 of an int32 tensor holding the 32 bits, in place: int32 products wrap to the low 32 bits, and int32's
    `>> 16` (which copies the sign bit) masked to 16 bits is the logical shift: the same bits as mix32."""
    for multiply in (True, True, False):
        x ^= (x >> 16).bitwise_and_(0xFFFF)
        if multiply:
            x *= MULT
    return x


def as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as the int32 of the same 32 bits."""
    return (x - (x >> 31 << 32)).to(torch.int32)


def scale(keys: torch.Tensor, layer: int, per_sample: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """(len(keys), per_sample) of `dtype`: 1/(1-p) where kept, 0 where dropped. An element is kept where its uniform
    value in [0, 1) on a 2**-24 grid, a function of (key, layer, column), is at least p."""
    base = as_int32(mix32(keys.to(torch.int64) ^ mix32(layer)))
    if keys.device.type != "cpu" or torch.compiler.is_compiling() or len(keys) * per_sample <= BLOCK:
        return block_scale(base, columns(0, per_sample, keys.device), p, dtype)
    out = torch.empty(len(keys), per_sample, dtype=dtype)
    width = min(per_sample, BLOCK)
    rows = BLOCK // width
    for c in range(0, per_sample, width):
        column = columns(c, min(c + width, per_sample), keys.device)
        for r in range(0, len(keys), rows):
            out[r:r + rows, c:c + width] = block_scale(base[r:r + rows], column, p, dtype)
    return out


def columns(start: int, stop: int, device: torch.device) -> torch.Tensor:
    # The column counter is mixed, shift and xor first, never multiplied: inductor folds `arange * constant` into an
    # index expression computed in the kernel's int32 index type, and on CUDA (H200, torch 2.11, 2026-12-04) a
    # compiled ViT-B/16 then failed to build ("Scalar 2654435769 is out of range for type int32"); a constant within
    # int32 overflows silently instead (pytorch/pytorch#175966). Bitwise ops are not folded, so the counter stays a
    # value.
    return mix32_(torch.arange(start, stop, device=device, dtype=torch.int32))


def block_scale(base: torch.Tensor, column: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """`scale` for the rows of `base` (their keys' part of the hash) and the columns of `column` (mixed)."""
    bits = mix32_(base[:, None] + column)  # int32 sums wrap: the low 32 bits of the int64 sum
    keep = (bits >> 8).bitwise_and_(0xFFFFFF).to(torch.float32).mul_(2.0 ** -24) >= p
    return keep.to(dtype).div_(1.0 - p) if p < 1.0 else keep.to(dtype)


class KeyedDrop(nn.Module):
    """Zeroes whole samples ("row": stochastic depth) or single elements ("element": dropout) with probability p and
    scales the rest by 1/(1-p), as torchvision's StochasticDepth and nn.Dropout do, in training mode only."""

    def __init__(self, p: float, mode: str, layer: int):
        super().__init__()
        self.p, self.mode, self.layer = p, mode, layer
        self.keys: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}, layer={self.layer}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.keys is None:
            raise RuntimeError(f"KeyedDrop (layer {self.layer}) in training mode needs the batch's sample keys: "
                               f"run the forward inside drop.keyed(model, keys)")
        if len(self.keys) != len(x):  # timm's relative-position MLPs (swinv2_cr, vit_relpos) drop from a shared table
            raise RuntimeError(f"KeyedDrop (layer {self.layer}) got {len(x)} rows for a batch of {len(self.keys)}: "
                               f"a dropout not applied per sample cannot be keyed per sample")
        per_sample = 1 if self.mode == "row" else x[0].numel()
        shape = (len(x), *[1] * (x.dim() - 1)) if self.mode == "row" else x.shape
        return x * scale(self.keys, self.layer, per_sample, self.p, x.dtype).view(shape)


def replace(model: nn.Module) -> int:
    """Swap every StochasticDepth, timm DropPath (matched by name: timm is optional) and nn.Dropout of `model` for a
    KeyedDrop of its rate, numbered in module order; returns how many. A StochasticDepth in "batch" mode (one draw
    for a whole batch: no sample owns it) is refused. torchvision's Swin attention (v1 and v2) applies its output
    dropout with F.dropout (per process: swin_t at --dropout 0.2 moved 0.041 with torch.manual_seed alone): its rate
    goes to a KeyedDrop child (no state_dict entry) applied to the attention's output by a forward hook. That is after
    the windows are put back, which only permutes the elements (and crops padding): the same i.i.d. draw, per sample.
    No layer for a rate of 0, so the other layers keep their numbers (and masks) in runs without --dropout."""
    layer = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, StochasticDepth):
            if module.mode != "row":
                raise ValueError(f"{name}: StochasticDepth in {module.mode!r} mode has no per-sample mask")
            new = KeyedDrop(module.p, "row", layer)
        elif type(module).__name__ == "DropPath" and type(module).__module__.startswith("timm."):
            if not module.scale_by_keep:
                raise ValueError(f"{name}: DropPath with scale_by_keep=False; KeyedDrop scales what it keeps")
            new = KeyedDrop(module.drop_prob, "row", layer)
        elif type(module) is nn.Dropout:
            new = KeyedDrop(module.p, "element", layer)
        elif isinstance(module, ShiftedWindowAttention):
            if module.attention_dropout > 0:  # on the attention weights, inside the function: fgic never sets it
                raise ValueError(f"{name}: attention_dropout is applied inside a function; KeyedDrop cannot key it")
            if module.dropout > 0:
                module.keyed_dropout = KeyedDrop(module.dropout, "element", layer)
                module.dropout = 0.0
                module.register_forward_hook(drop_output)
                layer += 1
            continue
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        layer += 1
    return layer


def drop_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return module.keyed_dropout(output)


@contextmanager
def keyed(model: nn.Module, keys: torch.Tensor | None):
    """The model's KeyedDrop layers use `keys` (one per sample of the batch, on the model's device) inside."""
    layers = [m for m in model.modules() if isinstance(m, KeyedDrop)]
    for m in layers:
        m.keys = keys
    try:
        yield
    finally:
        for m in layers:
            m.keys = None
