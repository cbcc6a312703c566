"""Fixtures of the host daemon's tests (helpers live in ``hosttest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hosttest import Site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)
