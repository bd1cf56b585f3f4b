"""Issue 14's families end to end (tests/families.py): one result on 1 and 2 processes, and a bitwise resume."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.families import FAMILIES, FamilyRuns, check_one_result, check_resume
from tests.helpers import wait_for_memory

pytestmark = [pytest.mark.e2e, pytest.mark.families]  # every test here starts processes
FAMILY_GB = 5  # vit_b_32 (88M parameters): 2 processes of ~1.7 GB, its runs' files in memory (see runs)


@pytest.fixture(scope="module", params=list(FAMILIES))
def runs(request, tmp_path_factory):
    """A family's runs; module-scoped and parametrized, so pytest runs one family's tests together. Their folder is
    in memory (/dev/shm) where the machine has it: the runs save and fsync checkpoints, and on this machine's disk that
    dominated (vit_b_32's 1-process run: 24.8 s, 10.6 s on /dev/shm). It goes before the next family's (vit_b_32's
    runs hold 3 GB): all the tests' folders in memory held 4 GB until the session's end, and the arch sweep's largest
    shard waited 15 minutes for memory and failed (CI, 2026-12-04)."""
    wait_for_memory(FAMILY_GB)  # not beside the arch sweep's largest shards (see wait_for_memory)
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else tmp_path_factory.getbasetemp()
    tmp = Path(tempfile.mkdtemp(prefix=f"fgic-{request.param}-", dir=where))
    try:
        yield FamilyRuns(request.param, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_one_result_on_1_and_2_processes(runs):
    check_one_result(runs)


def test_stop_mid_epoch_and_resume_bitwise(runs):
    check_resume(runs)
