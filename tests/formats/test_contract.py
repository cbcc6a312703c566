"""The format contract (vmreclaim.testing.FormatContract) for every built-in format
driver, each with images its format's reference tool makes (STYLE.md point 17)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from formats.imagetools import qemu_img_create
from vmreclaim.core import loader
from vmreclaim.testing import FormatContract, make_raw_image, run
from vmreclaim.testing.contracts.formats import SIZE, WRITTEN, qemu_io_writes

pytestmark = pytest.mark.qemu


def test_every_builtin_format_driver_is_under_contract() -> None:
    builtin = {d.name for d in loader.installed("formats") if d.distribution == "vmreclaim"}
    # rbd opens named images on a Ceph cluster, not files: its contract is tests/ceph.
    assert builtin == {"raw", "qcow2", "vhd", "vpc", "rbd"}
    for d in loader.installed("formats"):
        assert d.error is None, f"{d.name}: {d.error}"


class _QemuMade(FormatContract):
    create_options: ClassVar[dict[str, Any]] = {}

    def make_image(self, tmp_path: Path) -> Path:
        img = qemu_img_create(
            tmp_path / f"c.{self.qemu_format}", SIZE, self.qemu_format, **self.create_options
        )
        run(["qemu-io", "-f", self.qemu_format, *qemu_io_writes(WRITTEN), str(img)])
        return img


class TestRaw(FormatContract):
    driver = qemu_format = "raw"

    def make_image(self, tmp_path: Path) -> Path:
        return make_raw_image(tmp_path / "c.raw", SIZE, WRITTEN)


class TestQcow2(_QemuMade):
    driver = qemu_format = "qcow2"


class TestVhd(_QemuMade):
    driver, qemu_format = "vhd", "vpc"


class TestVpc(_QemuMade):
    """``vpc`` is the entry-point name QEMU users know; a fixed VHD this time."""

    driver, qemu_format = "vpc", "vpc"
    create_options: ClassVar[dict[str, Any]] = {"subformat": "fixed"}
