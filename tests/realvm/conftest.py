"""The real-VM test runs only when asked for (``pytest -m realvm``, tox env
``py311-realvm``): it builds a Debian guest (minutes, cached afterwards) and boots it
under TCG, which the core run should not pay for twice."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "realvm" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="real-VM test: run it with -m realvm (tox env py311-realvm)")
    for item in items:
        if item.get_closest_marker("realvm") is not None:
            item.add_marker(skip)
