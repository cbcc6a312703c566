"""Every built-in capture driver passes the capture contract (vmreclaim.testing), on a
real ext4 and XFS on loop devices."""

from __future__ import annotations

import pytest

from vmreclaim.core import loader
from vmreclaim.testing import CaptureContract

pytestmark = [pytest.mark.root]


def test_every_builtin_capture_is_under_contract() -> None:
    builtin = {d.name for d in loader.installed("captures") if d.distribution == "vmreclaim"}
    assert builtin == {"fsmap", "fiemap"}


class TestFsmapExt4(CaptureContract):
    driver = "fsmap"


class TestFiemapExt4(CaptureContract):
    driver = "fiemap"


class TestFsmapXfs(CaptureContract):
    driver = "fsmap"
    fstype = "xfs"
    size = 320 << 20


class TestFiemapXfs(CaptureContract):
    driver = "fiemap"
    fstype = "xfs"
    size = 320 << 20
