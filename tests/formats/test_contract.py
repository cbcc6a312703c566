"""The format contract: the same map, punch and refusal tests for every installed format
driver (STYLE.md point 17), parametrised by entry-point name.

A driver is tested with images its format's reference tool makes (``IMAGE_MAKERS``); a
third-party driver without a maker here is skipped with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from formats.imagetools import MiB, allocated, cli, qemu_img_create, qemu_io, qemu_read
from vmreclaim.core import loader
from vmreclaim.core.extents import ExtentKind
from vmreclaim.core.formats import ImageFile, ImageFormat
from vmreclaim.core.image import open_image
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.testing import make_raw_image, qemu_io_holding

pytestmark = pytest.mark.qemu

#: Guest ranges the makers fill with data: one inside the first MiB, one straddling
#: what is a cluster or block boundary in every format, one near the end.
WRITTEN = [(64 * 1024, 192 * 1024), (2 * MiB - 128 * 1024, 512 * 1024), (6 * MiB, MiB)]
SIZE = 8 * MiB

#: Driver name → (QEMU's name of the format, how to make an image with data at WRITTEN).
Maker = Callable[[Path], Path]


def _raw(tmp: Path) -> Path:
    return make_raw_image(tmp / "c.raw", SIZE, WRITTEN)


def _qemu(fmt: str, **opts: Any) -> Maker:
    def make(tmp: Path) -> Path:
        img = qemu_img_create(tmp / f"c.{fmt}", SIZE, fmt, **opts)
        qemu_io(img, *[f"write -P {i + 1} {s} {n}" for i, (s, n) in enumerate(WRITTEN)], fmt=fmt)
        return img

    return make


IMAGE_MAKERS: dict[str, tuple[str, Maker]] = {
    "raw": ("raw", _raw),
    "qcow2": ("qcow2", _qemu("qcow2")),
    "vhd": ("vpc", _qemu("vpc")),
    "vpc": ("vpc", _qemu("vpc", subformat="fixed")),
}

DRIVERS = sorted(d.name for d in loader.installed("formats"))


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name not in IMAGE_MAKERS:
        pytest.skip(f"no image maker for format driver {name!r} in the contract suite")
    return name


@pytest.fixture
def image_path(driver: str, tmp_path: Path) -> Path:
    return IMAGE_MAKERS[driver][1](tmp_path)


def test_every_format_driver_is_installed_and_loads() -> None:
    assert {"raw", "qcow2", "vhd", "vpc"} <= set(DRIVERS)
    for d in loader.installed("formats"):
        assert d.error is None, f"{d.name}: {d.error}"


def test_probe_recognises_its_own_images(driver: str, image_path: Path) -> None:
    fmt = loader.load_driver("formats", driver, ImageFormat)
    with ImageFile(image_path) as f:
        assert fmt.probe(f) > 0


def test_map_covers_the_disk_in_order_and_finds_the_data(driver: str, image_path: Path) -> None:
    with open_image(image_path, driver) as image:
        size = image.virtual_size
        assert size >= SIZE - MiB
        whole = image.map(ByteRange(0, size))
        whole.require_covers(ByteRange(0, size), driver)
        merged = whole.merged()
        assert set(np.unique(merged.kinds).tolist()) <= {int(k) for k in ExtentKind}
        data = merged.select(ExtentKind.DATA, ExtentKind.SHARED)
        for start, length in WRITTEN:
            assert data.guest_ranges().contains(RangeSet([start], [start + length])), (
                f"{driver}: written range {start}+{length} not mapped as data"
            )
        # Any window maps as the same window of the whole map.
        for lo, n in [(0, 1), (SIZE // 2 + 12345, 777), (5, size - 10), (size - 512, 512)]:
            part = image.map(ByteRange(lo, n))
            part.require_covers(ByteRange(lo, n), driver)
            assert part.merged().to_json() == merged.clip(ByteRange(lo, n)).merged().to_json()
        # Data never sits on the format's own structures, nor past the end of the file.
        host = whole.select(ExtentKind.DATA).host_ranges()
        assert not host.intersect(image.metadata_ranges())
        assert int(host.ends[-1]) <= image.data_file.size
        # The JSON shape of DESIGN.md section 8.
        doc = json.loads(json.dumps(merged.to_json()))
        assert all(set(e) == {"start", "length", "kind", "offset"} for e in doc)


def test_read_returns_what_qemu_reads(driver: str, image_path: Path) -> None:
    qemu_fmt = IMAGE_MAKERS[driver][0]
    with open_image(image_path, driver) as image:
        size = image.virtual_size
        assert image.read(0, size) == qemu_read(image_path, qemu_fmt, 0, size)


def test_info_has_the_contract_keys(driver: str, image_path: Path, capsys: Any) -> None:
    code, doc, _ = cli(capsys, "image", "info", str(image_path), "--format", driver, "--json")
    assert code == 0
    assert {"format", "virtual_size", "cluster_size", "allocated_bytes", "backing"} <= set(doc)
    assert doc["allocated_bytes"] == allocated(image_path) and doc["backing"] == []


def test_punch_frees_data_and_changes_nothing_else(driver: str, image_path: Path, capsys: Any) -> None:
    qemu_fmt = IMAGE_MAKERS[driver][0]
    with open_image(image_path, driver) as image:
        size = image.virtual_size
    before = qemu_read(image_path, qemu_fmt, 0, size)
    start, length = WRITTEN[1]
    code, doc, err = cli(capsys, "image", "reclaim", str(image_path), "--format", driver,
                         "--range", f"{start}:{length}", "--json")  # fmt: skip
    assert code == 0, err
    assert 0 < doc["punched_bytes"] <= length and doc["freed_bytes"] > 0
    assert doc["requested_bytes"] == length
    assert doc["punched_bytes"] + sum(s["length"] for s in doc["skipped"]) == length
    after = qemu_read(image_path, qemu_fmt, 0, size)
    changed = np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))
    assert changed.size and start <= int(changed[0]) and int(changed[-1]) < start + length
    assert not np.frombuffer(after, np.uint8)[changed].any()  # what changed is now zero
    assert changed.size >= doc["punched_bytes"] // 2  # the pattern bytes were non-zero


@pytest.mark.parametrize("bad", [f"{SIZE * 4}:4096", "0:0", f"{SIZE - 4096}:{SIZE}"])
def test_ranges_outside_the_disk_exit_2(driver: str, image_path: Path, capsys: Any, bad: str) -> None:
    before = image_path.read_bytes()
    code, _, _ = cli(
        capsys, "image", "reclaim", str(image_path), "--format", driver, "--range", bad, "--json"
    )
    assert code == 2
    assert image_path.read_bytes() == before


def test_busy_image_exits_3(driver: str, image_path: Path, capsys: Any) -> None:
    before = image_path.read_bytes()
    with qemu_io_holding(image_path, IMAGE_MAKERS[driver][0]):
        code, _, err = cli(capsys, "image", "reclaim", str(image_path), "--format", driver,
                           "--range", f"{WRITTEN[0][0]}:{WRITTEN[0][1]}", "--json")  # fmt: skip
    assert code == 3, err
    assert image_path.read_bytes() == before


def test_dry_run_writes_nothing(driver: str, image_path: Path, capsys: Any) -> None:
    before = image_path.read_bytes()
    code, doc, _ = cli(capsys, "image", "reclaim", str(image_path), "--format", driver,
                       "--range", f"0:{SIZE // 2}", "--dry-run", "--json")  # fmt: skip
    assert code == 0 and doc["dry_run"] is True and doc["freed_bytes"] == 0
    assert image_path.read_bytes() == before
