"""The core's defences against a format driver whose map is wrong (a hostile image or a
driver bug): inconsistent maps refuse the whole request, nothing is punched."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from vmreclaim.core.errors import CorruptImageError
from vmreclaim.core.extents import ExtentKind, ExtentMap
from vmreclaim.core.formats import Image, ImageFile
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.plugins import Plugins
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.testing import make_disk, make_raw_image

MIB = 1 << 20
K64 = 64 * 1024


class ScriptedImage(Image):
    """A real file whose 'format' maps guest cluster i to the host offset the test says."""

    def __init__(self, file: ImageFile, host_of_cluster: list[int], metadata: RangeSet) -> None:
        super().__init__(file, "scripted")
        self.host = host_of_cluster
        self.meta = metadata

    @property
    def virtual_size(self) -> int:
        return len(self.host) * K64

    @property
    def cluster_size(self) -> int:
        return K64

    def metadata_ranges(self) -> RangeSet:
        return self.meta

    def map(self, window: ByteRange) -> ExtentMap:
        n = len(self.host)
        starts = np.arange(n, dtype=np.int64) * K64
        kinds = np.full(n, ExtentKind.DATA, dtype=np.uint8)
        full = ExtentMap(starts, np.full(n, K64, dtype=np.int64), kinds, np.array(self.host, dtype=np.int64))
        return full.clip(window)


def scripted(tmp_path: Path, host: list[int], metadata: RangeSet | None = None) -> tuple[Path, ScriptedImage]:
    path = make_raw_image(tmp_path / "img", 8 * K64, [(0, 8 * K64)])
    return path, ScriptedImage(ImageFile(path), host, metadata or RangeSet([0], [K64]))


def reclaim_all(path: Path, image: Image) -> None:
    Pipeline(Plugins(load_entry_points=False)).reclaim(
        make_disk(path), image, RangeSet([0], [image.virtual_size])
    )


def test_two_guest_clusters_on_one_host_cluster_refused(tmp_path: Path) -> None:
    path, image = scripted(tmp_path, [K64, 2 * K64, 2 * K64])
    with pytest.raises(CorruptImageError, match="same host bytes"):
        reclaim_all(path, image)
    assert os.stat(path).st_blocks * 512 == 8 * K64


def test_data_on_metadata_refused(tmp_path: Path) -> None:
    path, image = scripted(tmp_path, [K64, 0])  # cluster 1 on the header cluster
    with pytest.raises(CorruptImageError, match="metadata at host"):
        reclaim_all(path, image)
    assert os.stat(path).st_blocks * 512 == 8 * K64


def test_data_past_end_of_file_refused(tmp_path: Path) -> None:
    path, image = scripted(tmp_path, [K64, 100 * K64])
    with pytest.raises(CorruptImageError, match="past the end"):
        reclaim_all(path, image)
    assert os.stat(path).st_blocks * 512 == 8 * K64


def test_consistent_scripted_map_punches_exactly_its_host_clusters(tmp_path: Path) -> None:
    path, image = scripted(tmp_path, [3 * K64, K64])
    before = path.read_bytes()
    reclaim_all(path, image)
    after = path.read_bytes()
    for c in range(8):
        chunk = slice(c * K64, (c + 1) * K64)
        if c in (1, 3):
            assert after[chunk] == bytes(K64)
        else:
            assert after[chunk] == before[chunk]
