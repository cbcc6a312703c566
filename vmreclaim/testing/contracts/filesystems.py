"""The filesystem-reader contract: what offline sparsify relies on from every
``vmreclaim.filesystems`` driver, whatever bytes the volume holds.

Subclass :class:`FilesystemContract` as ``Test<Something>`` and set ``driver``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from vmreclaim.core import loader
from vmreclaim.core.errors import VMReclaimError
from vmreclaim.core.filesystems import FilesystemReader
from vmreclaim.core.opening import open_image
from vmreclaim.core.volumes import Volume


def _whole(path: Path) -> Volume:
    image = open_image(path, "raw")
    return Volume(image, 0, image.virtual_size)


class FilesystemContract:
    """Every filesystem reader: honest capabilities, no claim on zeros or tiny volumes,
    and no traceback from random bytes (an error of the tree at most)."""

    #: The driver's entry-point name in ``vmreclaim.filesystems``.
    driver: ClassVar[str]

    def reader(self) -> FilesystemReader:
        return loader.load_driver("filesystems", self.driver, FilesystemReader)

    def test_capabilities_are_consistent(self) -> None:
        found = {d.name: d for d in loader.installed("filesystems")}
        assert self.driver in found and found[self.driver].error is None
        cls = loader.driver_class("filesystems", self.driver)
        assert issubclass(cls, FilesystemReader)
        if not cls.capabilities.free_space:
            assert cls.skip_reason, f"{self.driver}: a detect-only driver must say why it skips"

    @pytest.mark.parametrize("size", [0, 100, 4096, 1 << 20])
    def test_zeros_and_tiny_volumes_are_not_claimed(self, tmp_path: Path, size: int) -> None:
        img = tmp_path / "zero.img"
        with open(img, "wb") as f:
            f.truncate(size)
        volume = _whole(img)
        try:
            assert self.reader().probe(volume) is None
        finally:
            volume.image.close()

    def test_random_bytes_never_crash_a_probe(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(sum(self.driver.encode()))
        for i in range(20):
            img = tmp_path / f"r{i}.img"
            img.write_bytes(rng.integers(0, 256, size=256 * 1024, dtype=np.uint8).tobytes())
            volume = _whole(img)
            try:
                self.reader().probe(volume)  # a Detection or None; never a traceback
            except VMReclaimError:
                pass
            finally:
                volume.image.close()
