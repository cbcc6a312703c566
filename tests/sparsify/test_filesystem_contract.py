"""The filesystem-reader contract (vmreclaim.testing.FilesystemContract) for every
built-in ``vmreclaim.filesystems`` driver."""

from __future__ import annotations

from vmreclaim.core import loader
from vmreclaim.testing import FilesystemContract

BUILTIN = {"ext", "xfs", "btrfs", "ntfs", "vfat", "swap", "luks"}


def test_every_builtin_driver_is_under_contract() -> None:
    assert {d.name for d in loader.installed("filesystems") if d.distribution == "vmreclaim"} == BUILTIN
    assert all(d.error is None for d in loader.installed("filesystems"))
    assert {cls.driver for cls in FilesystemContract.__subclasses__()} == BUILTIN


class TestExt(FilesystemContract):
    driver = "ext"


class TestXfs(FilesystemContract):
    driver = "xfs"


class TestBtrfs(FilesystemContract):
    driver = "btrfs"


class TestNtfs(FilesystemContract):
    driver = "ntfs"


class TestVfat(FilesystemContract):
    driver = "vfat"


class TestSwap(FilesystemContract):
    driver = "swap"


class TestLuks(FilesystemContract):
    driver = "luks"
