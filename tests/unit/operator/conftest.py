"""The job spec fixture every operator unit test starts from (see ltj_fixtures.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from ltj_fixtures import JOB_SPEC


@pytest.fixture
def job_spec() -> dict[str, Any]:
    return copy.deepcopy(JOB_SPEC)
