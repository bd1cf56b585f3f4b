"""The tests' fixtures (their helpers are in tests/helpers.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fgic.demo import make_tiny


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
