"""Fixtures for the hypervisor driver tests: libvirt connections and daemons."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmreclaim.testing.guest import system_libvirtd


@pytest.fixture(scope="session")
def system_uri() -> Iterator[str]:
    """``qemu:///system`` served by a real libvirtd (started here if none runs)."""
    pytest.importorskip("libvirt", reason="needs libvirt-python (the kvm extra)")
    with system_libvirtd() as uri:
        yield uri
