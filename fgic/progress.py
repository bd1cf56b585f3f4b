"""Progress of a pass over a loader on rank 0: tqdm's bar on a terminal, plain lines in a log file or a Slurm log
(tqdm's carriage returns there join its frames onto the epoch lines, and other processes' output lands mid-bar)."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LINE_EVERY_S = 30.0  # a log line this often: 240 lines over a two-hour epoch, none for a pass under 30 s


def progress(loader, show: bool, desc: str, later_steps: int = 0, images_per_step: int = 0, stream=None, done: int = 0):
    """An iterable over `loader` that shows progress when `show`: on a terminal, tqdm's bar with the run's ETA; else
    a line every LINE_EVERY_S seconds (step, images/s, the ETA of the pass and of the run). `later_steps`: the steps
    of the run after this pass, at this pass's rate; `done`: the pass's steps before `loader` (an epoch resumed
    inside), counted in the step shown."""
    stream = stream or sys.stderr
    if show and stream.isatty():
        return Bar(loader, desc, later_steps, stream, done)
    return Lines(loader, desc, later_steps, images_per_step, stream, show, done)


def duration(seconds: float) -> str:
    """12s, 4m05s, 3h07m."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Bar(tqdm):
    """tqdm's bar, with the run's ETA beside the pass's."""

    def __init__(self, loader, desc: str, later_steps: int, stream, done: int):
        self.later_steps = later_steps  # before tqdm's first draw
        super().__init__(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5, file=stream,
                         initial=done, total=done + len(loader))

    @property
    def format_dict(self):
        d = super().format_dict
        steps = d["n"] - d.get("initial", 0)
        rate = d.get("rate") or (steps / d["elapsed"] if steps and d["elapsed"] else None)
        if self.later_steps and rate:
            run = ((d["total"] or 0) - d["n"] + self.later_steps) / rate
            d["postfix"] = ", ".join(filter(None, [d.get("postfix"), f"run ETA {duration(run)}"]))
        return d


class Lines:
    """Progress as whole lines at a steady interval: `epoch 3/8  step 40/120  412 img/s  ETA 3m12s (run 45m10s)`."""

    mininterval = LINE_EVERY_S  # as tqdm's: how often the caller's postfix is worth updating

    def __init__(self, loader, desc: str, later_steps: int, images_per_step: int, stream, show: bool, done: int):
        self.loader, self.desc, self.later_steps, self.images_per_step = loader, desc, later_steps, images_per_step
        self.stream, self.show, self.done, self.postfix = stream, show, done, ""

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        total, start = len(self.loader), time.perf_counter()
        last = start
        for step, item in enumerate(self.loader, 1):
            yield item
            now = time.perf_counter()
            if self.show and now - last >= self.mininterval and step < total:
                last = now
                print(self.line(step, total, now - start), file=self.stream, flush=True)

    def line(self, step: int, total: int, seconds: float) -> str:
        """`step` of this pass's `total`, after `seconds`; shown counted from the epoch's start."""
        rate = step / seconds
        parts = [self.desc, f"step {self.done + step}/{self.done + total}"]
        if self.images_per_step:
            parts.append(f"{rate * self.images_per_step:.0f} img/s")
        eta = f"ETA {duration((total - step) / rate)}"
        parts.append(eta + (f" (run {duration((total - step + self.later_steps) / rate)})" if self.later_steps else ""))
        return "  ".join(parts + ([self.postfix] if self.postfix else []))

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass
