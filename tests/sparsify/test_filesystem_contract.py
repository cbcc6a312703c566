"""The contract every ``vmreclaim.filesystems`` driver keeps, run against each installed one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vmreclaim.core import loader
from vmreclaim.core.errors import VMReclaimError
from vmreclaim.core.filesystems import FilesystemReader
from vmreclaim.core.image import open_image
from vmreclaim.core.volumes import Volume

DRIVERS = sorted(d.name for d in loader.installed("filesystems"))


def reader(name: str) -> FilesystemReader:
    return loader.load_driver("filesystems", name, FilesystemReader)


def whole(path: Path) -> Volume:
    image = open_image(path, "raw")
    return Volume(image, 0, image.virtual_size)


def test_builtin_drivers_are_installed() -> None:
    assert {"ext", "xfs", "btrfs", "ntfs", "vfat", "swap", "luks"} <= set(DRIVERS)
    assert all(d.error is None for d in loader.installed("filesystems"))


@pytest.mark.parametrize("name", DRIVERS)
def test_capabilities_are_consistent(name: str) -> None:
    cls = loader.driver_class("filesystems", name)
    assert issubclass(cls, FilesystemReader)
    if not cls.capabilities.free_space:
        assert cls.skip_reason, f"{name}: a detect-only driver must say why it skips"


@pytest.mark.parametrize("size", [0, 100, 4096, 1 << 20])
@pytest.mark.parametrize("name", DRIVERS)
def test_zeros_and_tiny_volumes_are_not_claimed(tmp_path: Path, name: str, size: int) -> None:
    img = tmp_path / "zero.img"
    with open(img, "wb") as f:
        f.truncate(size)
    volume = whole(img)
    try:
        assert reader(name).probe(volume) is None
    finally:
        volume.image.close()


@pytest.mark.parametrize("name", DRIVERS)
def test_random_bytes_never_crash_a_probe(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(sum(name.encode()))
    for i in range(20):
        img = tmp_path / f"r{i}.img"
        img.write_bytes(rng.integers(0, 256, size=256 * 1024, dtype=np.uint8).tobytes())
        volume = whole(img)
        try:
            reader(name).probe(volume)  # a Detection or None; never a traceback
        except VMReclaimError:
            pass
        finally:
            volume.image.close()
