"""Issue 14's families end to end (tests/families.py): one result on 1 and 2 processes, and a bitwise resume."""
from __future__ import annotations

import pytest

from tests.families import FAMILIES, FamilyRuns, check_one_result, check_resume, make_data

pytestmark = [pytest.mark.e2e, pytest.mark.families]  # every test here starts processes
GROUP = list(FAMILIES)


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    data = make_data(tmp_path_factory.mktemp("d") / "fam")
    made: dict[str, FamilyRuns] = {}
    return lambda family: made.setdefault(family, FamilyRuns(family, data, tmp_path_factory.mktemp(family)))


@pytest.mark.parametrize("family", GROUP)
def test_one_result_on_1_and_2_processes(family_runs, family):
    check_one_result(family_runs(family))


@pytest.mark.parametrize("family", GROUP)
def test_stop_mid_epoch_and_resume_bitwise(family_runs, family, tmp_path):
    check_resume(family_runs(family), tmp_path)
