"""The test hooks (fgic/testhooks.py): read from the environment in one place, doing nothing when unset."""
from __future__ import annotations

import re
import time

from fgic import testhooks
from tests.helpers import REPO


def test_the_hooks_are_read_from_their_variables_and_nothing_else_reads_them():
    assert testhooks.Hooks.read({}) == testhooks.NONE == testhooks.Hooks()
    hooks = testhooks.Hooks.read({"FGIC_TEST_STEP_SLEEP_S": "0.5", "FGIC_TEST_STALL_SAVE_S": "4",
                                  "FGIC_TEST_TORCH_DROP": "1"})
    assert hooks == testhooks.Hooks(step_sleep_s=0.5, stall_save_s=4.0, torch_drop=True)
    readers = sorted(p.name for p in (REPO / "fgic").glob("*.py") if re.search(r"FGIC_TEST_", p.read_text()))
    assert readers == ["testhooks.py"]


def test_a_stalled_save_waits_only_to_overwrite(tmp_path):
    hooks = testhooks.Hooks(stall_save_s=0.3)
    start = time.perf_counter()
    hooks.stall_overwrite(tmp_path / "checkpoint.pt")  # a first write: nothing to overwrite
    testhooks.NONE.stall_overwrite(tmp_path)
    assert time.perf_counter() - start < 0.2
    hooks.stall_overwrite(tmp_path)
    assert time.perf_counter() - start >= 0.3
