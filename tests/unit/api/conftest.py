"""Fixtures of the API unit tests."""

from __future__ import annotations

import pytest
from api_fakes import FakeEngine


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()
