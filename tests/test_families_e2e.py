"""Issue 14's families end to end (tests/families.py): one result on 1 and 2 processes, and a bitwise resume."""
from __future__ import annotations

import shutil

import pytest

from tests.families import FAMILIES, FamilyRuns, check_one_result, check_resume, make_data
from tests.helpers import wait_for_memory

pytestmark = [pytest.mark.e2e, pytest.mark.families]  # every test here starts processes
FAMILY_GB = 5  # vit_b_32 (88M parameters): 2 processes of ~1.7 GB, its runs' files in memory (conftest.py)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("d") / "fam")


@pytest.fixture(scope="module", params=list(FAMILIES))
def runs(request, data, tmp_path_factory):
    """A family's runs; module-scoped and parametrized, so pytest runs one family's tests together, and removes their
    folder (in memory, see conftest.py: vit_b_32's runs hold 3 GB) before the next family's."""
    wait_for_memory(FAMILY_GB)  # not beside the arch sweep's largest shards (see wait_for_memory)
    tmp = tmp_path_factory.mktemp(request.param)
    yield FamilyRuns(request.param, data, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def test_one_result_on_1_and_2_processes(runs):
    check_one_result(runs)


def test_stop_mid_epoch_and_resume_bitwise(runs):
    check_resume(runs)
