"""The pytest plugin: fixtures for tests of vmreclaim and of third-party plugins."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from vmreclaim.testing.ceph import CephCluster
from vmreclaim.testing.helpers import make_raw_image
from vmreclaim.testing.host import host_daemon  # noqa: F401 - a fixture, registered by import


@pytest.fixture
def raw_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``raw_image(size, data=[(offset, length), ...], name="disk.raw")``."""

    def factory(size: int, data: Iterable[tuple[int, int]] = (), name: str = "disk.raw") -> Path:
        return make_raw_image(tmp_path / name, size, data)

    return factory


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A running one-mon, one-mgr, one-OSD Ceph cluster with an ``rbd`` pool, shared by
    the session (it starts in 5-15 s) and removed at its end; skips where it cannot run
    (no packages, not root, the monitor's ports taken)."""
    from vmreclaim.testing.ceph import start_cluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("ceph"))
    try:
        yield cluster
    finally:
        cluster.stop()
