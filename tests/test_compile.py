"""--compile: training through torch.compile (inductor; on the CPU here) gives the uncompiled run's result up to the
compiler's float rounding, and its checkpoint holds the plain model's keys, so resuming and evaluating need no flag;
the keyed stochastic depth and dropout compile once."""
from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

from fgic import drop
from tests.helpers import read_jsonl, run_fgic, tiny_args

pytestmark = pytest.mark.e2e  # every test here starts processes

RUN = ("tiny", "resnet18-off-s2020")


def test_compiled_training_matches_the_uncompiled_run(tiny_data, tmp_path):
    # Without --deterministic: inductor compiles resnet18 in about a minute on 2 cores that way, three with it.
    args = ["-d", str(tiny_data), *[a for a in tiny_args(epochs=1) if a != "--deterministic"]]
    inductor = tmp_path / "inductor"  # a cache of its own: proof that the compiler ran, and a cold compile each time
    out = {}
    for name, extra in (("plain", []), ("compiled", ["--compile"])):
        res = run_fgic([*args, *extra, "--output-dir", str(tmp_path / name)], TORCHINDUCTOR_CACHE_DIR=str(inductor))
        assert res.returncode == 0, res.stderr
        out[name] = torch.load(tmp_path.joinpath(name, *RUN, "checkpoint.pt"), weights_only=True)["model"]
        compiled_code = [f for f in inductor.rglob("*") if f.is_file()]  # (an SGD step makes the folder alone)
        assert bool(compiled_code) == (name == "compiled")
    assert json.loads(tmp_path.joinpath("compiled", *RUN, "config.json").read_text())["compile"] is True
    assert out["compiled"].keys() == out["plain"].keys()  # no "_orig_mod." prefix
    diff = max((out["compiled"][k] - v).abs().max().item() for k, v in out["plain"].items()
               if k.endswith(("weight", "bias")))
    print(f"max abs difference of the parameters, compiled vs not, after one epoch: {diff:.3g}")
    assert diff < 0.02
    (plain,), (compiled,) = (read_jsonl(tmp_path.joinpath(n, *RUN, "metrics.jsonl")) for n in ("plain", "compiled"))
    assert compiled["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-2)  # the compiled forward's losses


def test_keyed_drop_layers_compile_once_and_draw_the_eager_masks():
    """The sample keys reach KeyedDrop as a module attribute that changes every step (fgic.drop.keyed): dynamo takes
    it as a graph input, so new keys neither recompile nor get baked in, and the compiled masks are eager's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), drop.KeyedDrop(0.5, "element", 0), torch.nn.Linear(16, 8),
                                drop.KeyedDrop(0.5, "row", 1))
    model.train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    x = torch.randn(6, 8)
    outputs = []
    for step in range(3):
        keys = torch.arange(6) + 100 * step
        with drop.keyed(model, keys):
            eager, ours = model(x), compiled(x)
        torch.testing.assert_close(ours, eager)
        outputs.append(ours)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not torch.equal(outputs[0], outputs[1])  # the masks moved with the keys
