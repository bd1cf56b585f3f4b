"""Slurm signals every process of a step: the loader workers and the cache builders leave the stop signals to the
training process, whatever the start method (forkserver is Python 3.14's default)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fgic import cache, data, signals
from tests.helpers import REPO, fgic_env


class Pids(torch.utils.data.Dataset):
    """Items that say which process made them."""

    def __len__(self):
        return 48

    def __getitem__(self, index):
        time.sleep(0.02)
        return os.getpid()


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_loader_workers_outlive_the_stop_signals(method):
    loader = data.Loader(Pids(), batch_size=4, num_workers=2, multiprocessing_context=method, persistent_workers=True)
    for epoch in range(2):  # persistent workers: the second epoch is served by the same, signalled processes
        batches = iter(loader)
        pids = {int(p) for p in next(batches)} | {int(p) for p in next(batches)}
        assert len(pids) == 2 and os.getpid() not in pids
        for sig in signals.STOP_SIGNALS:  # from another process, as Slurm's
            subprocess.run(["kill", f"-{sig.name[3:]}", *map(str, pids)], check=True)
        time.sleep(0.5)  # a worker that dies of them is noticed at the next batch ("killed by signal")
        served = {int(p) for batch in batches for p in batch}
        assert served <= pids and all(os.path.exists(f"/proc/{pid}") for pid in pids)
    del batches, loader


EXIT_HOLDING_A_LOADER = """
import sys
from fgic import data
from tests.test_helper_processes import Pids
loader = data.Loader(Pids(), batch_size=4, num_workers=2, multiprocessing_context=sys.argv[1], persistent_workers=True)
batches = iter(loader)
next(batches)
raise SystemExit(3)  # still holding the loader: multiprocessing's exit handler ends its workers with SIGTERM
"""


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_the_training_process_still_ends_its_loader_workers(method):
    """The workers take SIGTERM from the process that started them (under forkserver, not their parent)."""
    res = subprocess.run([sys.executable, "-c", EXIT_HOLDING_A_LOADER, method], cwd=REPO, env=fgic_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr


FILL = cache._fill


def fill_signalled(chunk):
    """A cache builder's task that is sent the stop signals as it starts (module level: the pool pickles it)."""
    for sig in signals.STOP_SIGNALS:
        os.kill(os.getpid(), sig)
    return FILL(chunk)


@pytest.mark.e2e
def test_cache_builders_outlive_the_stop_signals(tmp_path, monkeypatch):
    from PIL import Image
    paths = []
    for i in range(24):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(paths[-1])
    monkeypatch.setattr(cache, "CHUNK", 2)
    monkeypatch.setattr(cache, "_fill", fill_signalled)
    array = cache.ensure(tmp_path / "cache", tmp_path, "train", [(str(p), 0) for p in paths], 8, workers=2)
    assert [int(array[i, 0, 0, 0]) for i in range(24)] == list(range(24))
