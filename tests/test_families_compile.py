"""Every backbone family compiles whole, its loss included (what --compile hands torch.compile: fgic.engine.WithLoss),
with the keyed stochastic depth and dropout drawing their masks: one graph, no break (fullgraph), forward and backward
traced by AOT autograd. On the CPU the backend is aot_eager, which runs the traced graphs' own ops: the loss and every
gradient must be eager's bit for bit. Inductor's code generation is tested on resnet18 here (tests/test_compile.py)
and on a GPU for each family (tests/test_gpu.py::test_each_family_trains_channels_last_in_bf16)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fgic import engine
from tests.families import FAMILIES, family_model, has_masks
from tests.helpers import optional

pytestmark = [pytest.mark.e2e, pytest.mark.families]  # in-process, but seconds of tracing a family (110 s in all)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_compiles_in_one_graph_with_its_loss_and_masks(family):
    arch, crop, extra, _ = FAMILIES[family]
    if arch.startswith("timm:"):
        optional("timm")
    torch.manual_seed(0)
    model = family_model(arch, crop, extra)
    assert family == "regnet" or has_masks(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    images, labels, keys = torch.randn(2, 3, crop, crop), torch.tensor([0, 1]), torch.tensor([7, 1234567])
    torch._dynamo.reset()
    results = []
    for net, compiled in ((model, False), (copy.deepcopy(model), True)):
        step = engine.WithLoss(net, criterion)
        if compiled:
            step = torch.compile(step, backend="aot_eager", fullgraph=True)  # a graph break raises
        loss, _ = engine.forward(step, images, labels, criterion, torch.device("cpu"), "off", keys)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in net.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    assert torch.equal(loss, eager_loss), (loss, eager_loss)
    assert eager_grads.keys() == grads.keys()
    for name, grad in eager_grads.items():
        assert (grad is None) == (grads[name] is None), name
        assert grad is None or torch.equal(grads[name], grad), name
