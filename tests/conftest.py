"""The tests' fixtures (their helpers are in tests/helpers.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Compiled modules kept (in __pycache__, ignored by git) even where PYTHONDONTWRITEBYTECODE is set, as on this
# machine: pytest then rewrites the tests' asserts once, not in every worker of every run, and the fgic.ddp processes
# the tests start read fgic's bytecode instead of compiling its source. The quick loop: 66 s before, 58 after.
sys.dont_write_bytecode = False

from fgic.demo import make_tiny  # noqa: E402  (after the line above: fgic's modules get their bytecode written too)


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
