"""Fixtures for tests that boot a real guest (``pytest -m guest``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmreclaim.testing import require_root, require_tool
from vmreclaim.testing.guest import GuestKit, build_kit


@pytest.fixture(scope="session")
def guest_kit(tmp_path_factory: pytest.TempPathFactory) -> GuestKit:
    """Kernel and initramfs of the test guest, built once per session."""
    require_root()
    require_tool("qemu-system-x86_64", "busybox", "qemu-img", "mkfs.ext4")
    if not list(Path("/boot").glob("vmlinuz-*")):
        pytest.skip("needs an installed kernel (linux-image-amd64, installed by scripts/setup.sh)")
    return build_kit(tmp_path_factory.mktemp("guest-kit"))
