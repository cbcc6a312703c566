"""Tests against a real single-node Ceph cluster (the ``ceph_cluster`` fixture of
``vmreclaim.testing``). They carry the marker ``ceph`` and run in tox's ``py311-ceph``
env, which links Debian's rados/rbd bindings into the env; elsewhere they skip."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vmreclaim.testing.ceph import CephCluster

pytestmark = pytest.mark.ceph
_counter = itertools.count()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/ceph/" in str(item.fspath):
            item.add_marker(pytest.mark.ceph)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> CephCluster:
    # Bindings first: an env without them (py311-core) must not start a cluster only to skip.
    pytest.importorskip("rbd", reason="Debian's rbd bindings: python -m vmreclaim.testing.ceph link-bindings")
    found: CephCluster = request.getfixturevalue("ceph_cluster")
    return found


@pytest.fixture
def new_image(cluster: CephCluster) -> Callable[..., str]:
    """Factory: ``new_image(size="64M", object_size="64K")`` creates a fresh image in the
    test pool and returns its short name; removed (with its snapshots) afterwards."""
    made: list[str] = []

    def factory(size: str = "16M", object_size: str = "64K", *extra: str) -> str:
        name = f"img{next(_counter)}"
        cluster.rbd("create", "--size", size, "--object-size", object_size, *extra, f"{cluster.pool}/{name}")
        made.append(name)
        return name

    yield factory  # type: ignore[misc]
    for name in reversed(made):
        subprocess.run(["rbd", "--conf", str(cluster.conf), "snap", "purge", f"{cluster.pool}/{name}"],
                       capture_output=True, check=False)
        subprocess.run(["rbd", "--conf", str(cluster.conf), "rm", f"{cluster.pool}/{name}"],
                       capture_output=True, check=False)


def qemu_io(spec: str, *commands: str, read_only: bool = False) -> str:
    """Run ``qemu-io`` commands on an RBD image through QEMU's own rbd driver."""
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for c in commands:
        args += ["-c", c]
    done = subprocess.run([*args, spec], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "failed" not in done.stdout, done.stdout + done.stderr
    return done.stdout


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmreclaim", *map(str, args)], capture_output=True,
                          text=True, timeout=300, check=False)


def cli_json(*args: str | Path) -> dict:  # type: ignore[type-arg]
    done = cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]
