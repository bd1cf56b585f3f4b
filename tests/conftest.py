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


# The slowest files, slowest first (CI run of 2026-12-05, 2 cores: 670 s down to 46 s of `--durations`). `-n auto
# --dist loadfile` hands each worker whole files in collection order; xdist's own order (most tests first) left the
# 400-s compile file and the 125-s README walk to the end, with the other worker idle.
SLOWEST_FILES = ["test_families_e2e.py", "test_arch_sweep.py", "test_compile.py", "test_resume.py", "test_slurm.py",
                 "test_readme.py", "test_interrupt.py", "test_demo.py", "test_failures.py", "test_sweep_script.py",
                 "test_predict_export.py", "test_recipes_e2e.py", "test_run_records.py"]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """The slowest files first, then the others by their number of tests (xdist's own order), each file's tests in
    their order."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -counts[item.path.name], str(item.path)))
