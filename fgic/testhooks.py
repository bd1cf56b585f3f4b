"""Test hooks: what the tests and the Slurm lab set in the environment to make a run slow or measurable at a chosen
point. Read once, by fgic.ddp's main, and handed to the code they act in; unset (the default), they do nothing.

  FGIC_TEST_STEP_SLEEP_S=S   sleep S seconds before each stop agreement (after every step on the CPU, every
                             STOP_CHECK_EVERY steps on a GPU, and at the end of each epoch): slow steps, so that a
                             signal lands mid-training on any machine
  FGIC_TEST_STALL_SAVE_S=S   hold the overwrite of an existing checkpoint.pt back S seconds, its temporary file
                             written: a kill then lands mid-save
  FGIC_TEST_TORCH_DROP=1     build the model with torch's own per-process dropout and stochastic depth masks instead
                             of fgic's keyed ones, to measure what the keyed masks change
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hooks:
    step_sleep_s: float = 0.0
    stall_save_s: float = 0.0
    torch_drop: bool = False

    @classmethod
    def read(cls, env: os._Environ | dict = os.environ) -> Hooks:
        return cls(step_sleep_s=float(env.get("FGIC_TEST_STEP_SLEEP_S") or 0),
                   stall_save_s=float(env.get("FGIC_TEST_STALL_SAVE_S") or 0),
                   torch_drop=bool(env.get("FGIC_TEST_TORCH_DROP")))

    def slow_step(self) -> None:
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)

    def stall_overwrite(self, path: Path) -> None:
        if self.stall_save_s and path.exists():
            time.sleep(self.stall_save_s)


NONE = Hooks()
