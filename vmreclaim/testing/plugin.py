"""The pytest plugin: fixtures for tests of vmreclaim and of third-party plugins."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from vmreclaim.testing.helpers import make_raw_image
from vmreclaim.testing.host import host_daemon  # noqa: F401 - a fixture, registered by import


@pytest.fixture
def raw_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``raw_image(size, data=[(offset, length), ...], name="disk.raw")``."""

    def factory(size: int, data: Iterable[tuple[int, int]] = (), name: str = "disk.raw") -> Path:
        return make_raw_image(tmp_path / name, size, data)

    return factory
