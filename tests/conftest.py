"""The tests' fixtures (their helpers are in tests/helpers.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fgic.demo import make_tiny


def pytest_configure(config):
    """The tests' temporary folders in memory (/dev/shm) where the machine has it and no --basetemp was given: the
    runs save and fsync checkpoints, and on this machine's disk that dominated (vit_b_32's 1-process run: 24.8 s,
    10.6 s on /dev/shm). pyproject's tmp_path_retention_policy = "failed" removes a passed test's folder at once."""
    shm = Path("/dev/shm")
    if config.option.basetemp is None and shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(shm))  # where pytest makes pytest-of-USER


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes, 24 train images, 101 test images (34 + 34 + 33)."""
    return make_tiny(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """The tests' decoded-image caches (fgic.cache) go to a temporary folder, not the user's."""
    folder = tmp_path_factory.mktemp("fgic-cache")
    os.environ["FGIC_CACHE"] = str(folder)
    return folder
