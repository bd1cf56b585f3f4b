"""End to end with stochastic depth and dropout (EfficientNet-B0: both): 1 and 2 processes give one result up to float
rounding, because a sample's masks are keyed by (seed, epoch, index, layer); torch's per-process masks do not."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import max_difference, read_jsonl, run_fgic, tiny_args

pytestmark = pytest.mark.e2e  # every test here starts processes

ARCH, NAME = "efficientnet_b0", "efficientnet_b0-off-s2020"
# lr raised so that the tiny run's 4 steps move the weights; EfficientNet-B0's own rates: stochastic depth up to 0.2,
# dropout 0.2 before its head
FLAGS = ["--arch", ARCH, "--lr", "0.05"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """1 and 2 processes; the rounding control (1 process, torch's native BatchNorm instead of --deterministic's); and
    2 processes with torch's own masks (drawn per process from its generator)."""
    out = {}
    for key, world, env in (("w1", 1, {}), ("w2", 2, {}), ("control", 1, {}),
                            ("torch_masks", 2, {"FGIC_TEST_TORCH_DROP": "1"})):
        folder = tmp_path_factory.mktemp(key)
        flags = tiny_args() if key != "control" else [a for a in tiny_args() if a != "--deterministic"]
        res = run_fgic(["-d", str(tiny_data), *flags, *FLAGS, "--output-dir", str(folder)], nproc=world, **env)
        assert res.returncode == 0, res.stdout + res.stderr
        out[key] = folder / "tiny" / NAME
    return out


def test_keyed_masks_give_one_result_on_1_and_2_processes(runs):
    weights = {k: torch.load(v / "checkpoint.pt", weights_only=True)["model"] for k, v in runs.items()}
    control = max_difference(weights["control"], weights["w1"])
    keyed = max_difference(weights["w2"], weights["w1"])
    per_process = max_difference(weights["torch_masks"], weights["w1"])
    print(f"{ARCH}, max abs weight difference from 1 process: rounding control {control:.3g}, 2 processes "
          f"{keyed:.3g}, 2 processes with torch's per-process masks {per_process:.3g}")
    assert control > 0  # the control measures rounding (were it 0, the bound below would demand bitwise)
    assert keyed <= 10 * control, (keyed, control)
    assert per_process > 10 * max(keyed, control), (per_process, keyed, control)  # what keying buys, measured
    metrics = {k: read_jsonl(v / "metrics.jsonl") for k, v in runs.items()}
    assert [m["test_correct"] for m in metrics["w2"]] == [m["test_correct"] for m in metrics["w1"]]
