"""VHD against QEMU (fixed and dynamic disks QEMU makes) and against the specification
(differencing disks, partial sector bitmaps, other creators), which QEMU's vpc driver
cannot check: it reads a differencing disk as a dynamic one and ignores bitmaps."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.imagetools import (
    MiB,
    VhdSpec,
    assert_agrees_with_qemu,
    bitmap_of,
    cli,
    pattern,
    qemu_img_create,
    qemu_io,
    qemu_read,
    sh,
    spec_map,
    vhd_checksum,
    write_vhd,
)
from vmreclaim.core.errors import CorruptImageError, UnsupportedImageError
from vmreclaim.core.extents import ExtentKind
from vmreclaim.core.opening import open_image
from vmreclaim.core.ranges import ByteRange

pytestmark = pytest.mark.qemu

EXAMPLES = int(os.environ.get("VMRECLAIM_ORACLE_EXAMPLES", min(settings.default.max_examples, 30)))
W2RU = 0x57327275


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    subformat=st.sampled_from(["dynamic", "fixed"]),
    size=st.integers(1, 12).map(lambda n: n * MiB + 4096),
    writes=st.lists(st.tuples(st.integers(0, 12 * MiB // 512), st.integers(1, 4096)), max_size=8),
)
def test_map_agrees_with_qemu_img_map(
    tmp_path_factory: pytest.TempPathFactory, subformat: str, size: int, writes: list[tuple[int, int]]
) -> None:
    tmp = tmp_path_factory.mktemp("v")
    img = qemu_img_create(tmp / "d.vhd", size, "vpc", subformat=subformat)
    with open_image(img, "vpc") as image:
        vsize = image.virtual_size
    cmds = [f"write -P {i + 1} {s * 512} {min(n * 512, vsize - s * 512)}" for i, (s, n) in enumerate(writes)
            if s * 512 < vsize]  # fmt: skip
    if cmds:
        qemu_io(img, *cmds, fmt="vpc")
    assert_agrees_with_qemu(img, "vpc", strict_zero=False)
    with open_image(img, writing=False) as image:
        assert image.format_name == "vhd"
        assert image.read(0, vsize) == qemu_read(img, "vpc", 0, vsize)


def patch_creator(path: Path, creator: bytes, *, at: int) -> None:
    """Rewrite the creator application and the current size (64 MiB, less than the CHS
    size QEMU rounded up to) of the footer at ``at``, and fix its checksum."""
    with open(path, "r+b") as f:
        f.seek(at)
        footer = bytearray(f.read(512))
        footer[28:32] = creator
        footer[48:56] = struct.pack(">Q", 64 * MiB)
        footer[64:68] = struct.pack(">I", vhd_checksum(footer, 64))
        f.seek(at)
        f.write(footer)


@pytest.mark.parametrize("creator", [b"vpc ", b"qemu", b"win ", b"d2v ", b"qem2", b"CTXS", b"tap\0"])
def test_virtual_size_follows_qemus_rule(tmp_path: Path, creator: bytes) -> None:
    img = qemu_img_create(tmp_path / "s.vhd", 64 * MiB, "vpc")
    patch_creator(img, creator, at=0)
    patch_creator(img, creator, at=img.stat().st_size - 512)
    info = sh("qemu-img", "info", "-f", "vpc", "--output=json", img).stdout
    expected = __import__("json").loads(info)["virtual-size"]
    with open_image(img, writing=False) as image:
        assert image.virtual_size == expected
        assert image.virtual_size == (64 * MiB if creator not in (b"vpc ", b"qemu") else 67125248)


def test_force_size_image_uses_current_size(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "f.vhd", 64 * MiB + 512, "vpc", force_size=True)
    with open_image(img, writing=False) as image:
        assert image.virtual_size == 64 * MiB + 512
        assert image.info()["creator"] == "qem2"


@st.composite
def differencing_pairs(draw: st.DrawFn) -> tuple[int, dict[int, list[int]], int]:
    block = draw(st.sampled_from([512 * 1024, 2 * MiB]))
    nblocks = draw(st.integers(1, 5))
    spb = block // 512
    blocks = {}
    for b in draw(st.sets(st.integers(0, nblocks - 1))):
        runs = draw(st.lists(st.tuples(st.integers(0, spb - 1), st.integers(1, spb)), max_size=4))
        blocks[b] = sorted({s for lo, n in runs for s in range(lo, min(spb, lo + n))})
    return block, blocks, nblocks


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pair=differencing_pairs())
def test_differencing_disk_follows_the_specification(
    tmp_path_factory: pytest.TempPathFactory, pair: tuple[int, dict[int, list[int]], int]
) -> None:
    block, bitmaps, nblocks = pair
    tmp = tmp_path_factory.mktemp("d")
    size = nblocks * block
    parent_data = pattern(size, 99)
    parent = write_vhd(tmp / "parent.vhd", VhdSpec(size=size, block_size=block, blocks={
        b: (b"\xff" * 512, parent_data[b * block : (b + 1) * block]) for b in range(nblocks)}))  # fmt: skip
    with open_image(parent, writing=False) as p:
        uid = p.footer.unique_id  # type: ignore[attr-defined]
    child_data = {b: pattern(block, b) for b in bitmaps}
    spec = VhdSpec(size=size, block_size=block, parent=parent, parent_uid=uid,
                   locators=[(W2RU, b".\\parent.vhd".decode().encode("utf-16-le"))],
                   blocks={b: (bitmap_of(s, block), child_data[b]) for b, s in bitmaps.items()})  # fmt: skip
    child = write_vhd(tmp / "child.vhd", spec)
    expected = spec_map(spec)
    with open_image(child, writing=False) as image:
        assert image.info()["subformat"] == "differencing"
        m = image.map(ByteRange(0, size))
        got = m.kinds[np.searchsorted(m.starts + m.lengths, np.arange(size // 512) * 512, side="right")]
        want = np.array(
            [ExtentKind.DATA if k == "data" else ExtentKind.UNALLOCATED for _s, _o, k in expected]
        )
        assert np.array_equal(got, want)
        for ext in m.select(ExtentKind.DATA):
            first = ext.start // 512
            assert ext.offset == expected[first][1]
        # Reads: the child's sectors where its bit is set, the parent's elsewhere.
        want_bytes = bytearray(parent_data)
        for b, sectors in bitmaps.items():
            for s in sectors:
                at = b * block + s * 512
                want_bytes[at : at + 512] = child_data[b][s * 512 : s * 512 + 512]
        assert image.read(0, size) == bytes(want_bytes)
        # No structure overlaps another, and no data lies on one.
        assert not m.select(ExtentKind.DATA).host_ranges().intersect(image.metadata_ranges())


def test_dynamic_disk_clear_bits_are_unallocated_zeros(tmp_path: Path) -> None:
    data = pattern(2 * MiB, 3)
    img = write_vhd(tmp_path / "p.vhd", VhdSpec(size=4 * MiB, blocks={1: (bitmap_of(range(8, 16)), data)}))
    with open_image(img, writing=False) as image:
        m = image.map(ByteRange(0, 4 * MiB))
        assert [(e.start, e.length, e.kind.label) for e in m] == [
            (0, 2 * MiB + 4096, "unallocated"), (2 * MiB + 4096, 4096, "data"),
            (2 * MiB + 8192, 2 * MiB - 8192, "unallocated")]  # fmt: skip
        assert image.read(2 * MiB, 8192) == bytes(4096) + data[4096:8192]


def corrupt(path: Path, at: int, value: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(value)


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        (64, b"\0\0\0\1", "VHD footer at 0x0: checksum"),
        (512 + 36, b"\0\0\0\1", "VHD dynamic header at 0x200: checksum"),
        (512, b"notspars", "VHD dynamic header at 0x200: cookie"),
    ],
)
def test_bad_checksums_and_cookies_exit_4_naming_the_structure(
    tmp_path: Path, capsys: Any, where: int, value: bytes, message: str
) -> None:
    img = qemu_img_create(tmp_path / "d.vhd", 8 * MiB, "vpc")
    qemu_io(img, "write -P 1 0 1M", fmt="vpc")
    corrupt(img, where, value)
    code, _, err = cli(capsys, "image", "map", str(img), "--json")
    assert code == 4 and message in err, err


def test_bad_end_footer_maps_from_the_copy_but_is_not_punchable(tmp_path: Path, capsys: Any) -> None:
    img = qemu_img_create(tmp_path / "d.vhd", 8 * MiB, "vpc")
    qemu_io(img, "write -P 1 0 1M", fmt="vpc")
    corrupt(img, img.stat().st_size - 512 + 64, b"\0\0\0\1")
    code, doc, _ = cli(capsys, "image", "map", str(img), "--json")
    assert code == 0 and doc[0]["kind"] == "data"
    code, _, err = cli(capsys, "image", "reclaim", str(img), "--range", "0:1048576", "--json")
    assert code == 4 and "footer at the end" in err


def test_missing_parent_and_wrong_parent_are_refused(tmp_path: Path) -> None:
    parent = write_vhd(tmp_path / "parent.vhd", VhdSpec(size=2 * MiB))
    locators = [(W2RU, "parent.vhd".encode("utf-16-le"))]
    spec = VhdSpec(size=2 * MiB, parent=parent, parent_uid=b"\x01" * 16, locators=locators)
    child = write_vhd(tmp_path / "child.vhd", spec)
    with pytest.raises(CorruptImageError, match="unique id"):
        open_image(child, writing=False)
    parent.unlink()
    with pytest.raises(UnsupportedImageError, match="parent of differencing VHD not found"):
        open_image(child, writing=False)


def test_overlapping_blocks_are_corrupt(tmp_path: Path) -> None:
    img = write_vhd(
        tmp_path / "o.vhd", VhdSpec(size=4 * MiB, blocks={0: (b"\xff" * 512, b""), 1: (b"\xff" * 512, b"")})
    )
    with open(img, "r+b") as f:  # point block 1 half way into block 0
        f.seek(1536)
        first = struct.unpack(">I", f.read(4))[0]
        f.write(struct.pack(">I", first + 8))
    with pytest.raises(CorruptImageError, match="overlaps block 0"):
        open_image(img, writing=False)
