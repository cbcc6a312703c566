"""Punching qcow2 and VHD images, end to end through the real CLI (and the API).

After every punch: ``qemu-img check`` is clean, every guest byte outside the punched
ranges reads back as before (through QEMU), punched ranges read zero; refusals leave
the image (and its backing file) byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import pytest

from formats.imagetools import (
    KiB,
    MiB,
    VhdSpec,
    allocated,
    bitmap_of,
    cli,
    our_map,
    pattern,
    qemu_check,
    qemu_img_create,
    qemu_io,
    qemu_read,
    sh,
    write_vhd,
)
from vmreclaim import hookimpl
from vmreclaim.core.errors import ImageBusyError, UnsupportedImageError
from vmreclaim.core.extents import ExtentKind
from vmreclaim.core.opening import open_image
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.plugins import Plugins
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.core.reclaim import ReclaimPlan
from vmreclaim.testing import make_disk, qemu_io_holding

pytestmark = pytest.mark.qemu

W2RU = 0x57327275  # parent locator: relative Windows path, UTF-16 LE


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_punched(before: bytes, after: bytes, punched: list[tuple[int, int]]) -> None:
    """Guest bytes in ``punched`` read zero; every other byte is unchanged."""
    assert len(before) == len(after)
    edges = [0]
    for start, length in sorted(punched):
        assert after[start : start + length] == bytes(length), f"guest [{start}, +{length}) not zero"
        edges += [start, start + length]
    edges.append(len(before))
    for lo, hi in zip(edges[::2], edges[1::2], strict=True):
        assert after[lo:hi] == before[lo:hi], f"guest bytes [{lo}, {hi}) changed"


def punchable(img: Path, guest: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The guest ranges whose host bytes are whole host-filesystem blocks (4 KiB)."""
    out = []
    with open_image(img, writing=False) as image:
        for start, length in guest:
            for ext in image.map(ByteRange(start, length)):
                if ext.kind is not ExtentKind.DATA or ext.offset is None:
                    continue
                lo = -(-ext.offset // 4096) * 4096
                hi = (ext.offset + ext.length) // 4096 * 4096
                if hi > lo:
                    out.append((ext.start + lo - ext.offset, hi - lo))
    return out


@pytest.fixture
def full_qcow2(tmp_path: Path) -> Path:
    img = qemu_img_create(tmp_path / "full.qcow2", 8 * MiB)
    qemu_io(img, "write -P 7 0 8M")
    return img


def test_punch_qcow2_frees_blocks_finer_than_a_cluster(full_qcow2: Path, capsys: Any) -> None:
    img = full_qcow2
    before = qemu_read(img, "qcow2", 0, 8 * MiB)
    blocks = allocated(img)
    # A single 4 KiB block inside a 64 KiB cluster, a cluster and a half, and an
    # unaligned range whose partial blocks must stay.
    ranges = [f"{68 * KiB}:4096", f"{MiB}:{96 * KiB}", f"{3 * MiB + 100}:{8192}"]
    code, doc, err = cli(capsys, "image", "reclaim", str(img), *[f"--range={r}" for r in ranges], "--json")
    assert code == 0, err
    assert doc["mode"] == "punch" and doc["requested_bytes"] == 4096 + 96 * KiB + 8192
    assert doc["punched_bytes"] == 4096 + 96 * KiB + 4096  # one whole block of the unaligned range
    # Measured: the host filesystem may spend a block on its extent tree after a punch.
    assert doc["freed_bytes"] == blocks - allocated(img) >= doc["punched_bytes"] - 8192
    assert [s["reason"] for s in doc["skipped"]] == ["partial-block", "partial-block"]
    qemu_check(img)
    after = qemu_read(img, "qcow2", 0, 8 * MiB)
    assert_punched(before, after, [(68 * KiB, 4096), (MiB, 96 * KiB), (3 * MiB + 4096, 4096)])
    # QEMU itself reads zeros there, and the image map is unchanged (metadata untouched).
    qemu_io(img, f"read -P 0 {68 * KiB} 4k", f"read -P 7 {64 * KiB} 4k")
    assert our_map(img).bytes_of(ExtentKind.DATA) == 8 * MiB


def test_punch_extended_l2_subclusters(tmp_path: Path, capsys: Any) -> None:
    img = qemu_img_create(tmp_path / "x.qcow2", 4 * MiB, extended_l2=True, cluster_size=128 * KiB)
    qemu_io(img, "write -P 1 0 4M", "write -z 132k 4k")  # a zero subcluster inside a cluster
    before = qemu_read(img, "qcow2", 0, 4 * MiB)
    code, doc, _ = cli(capsys, "image", "reclaim", str(img), "--range", f"{128 * KiB}:{16 * KiB}", "--json")
    assert code == 0
    assert doc["punched_bytes"] == 12 * KiB
    assert doc["skipped"] == [{"start": 132 * KiB, "length": 4096, "reason": "zero"}]
    qemu_check(img)
    assert_punched(before, qemu_read(img, "qcow2", 0, 4 * MiB), [(128 * KiB, 16 * KiB)])


def test_shared_compressed_and_zero_clusters_are_skipped(tmp_path: Path, capsys: Any) -> None:
    img = qemu_img_create(tmp_path / "s.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 0 1M", "write -c -P 2 2M 64k", "write -z 3M 64k")
    sh("qemu-img", "snapshot", "-c", "keep", img)
    digest_before = digest(img)
    code, doc, _ = cli(capsys, "image", "reclaim", str(img), "--range", f"0:{4 * MiB}", "--json")
    assert code == 0
    assert doc["punched_bytes"] == 0 and doc["freed_bytes"] == 0
    reasons = {(s["start"], s["reason"]) for s in doc["skipped"]}
    assert (0, "shared") in reasons and (2 * MiB, "compressed") in reasons and (3 * MiB, "zero") in reasons
    assert digest(img) == digest_before


def test_backing_file_is_never_written(tmp_path: Path, capsys: Any) -> None:
    base = qemu_img_create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 0 4M")
    top = qemu_img_create(tmp_path / "top.qcow2", 4 * MiB, backing="base.qcow2")
    qemu_io(top, "write -P 2 1M 1M")
    base_digest, base_mtime = digest(base), base.stat().st_mtime_ns
    before = qemu_read(top, "qcow2", 0, 4 * MiB)
    code, doc, _ = cli(
        capsys, "image", "reclaim", str(top), "--range", f"0:{4 * MiB}", "--format", "qcow2", "--json"
    )
    assert code == 0
    assert doc["punched_bytes"] == MiB
    assert {(s["start"], s["length"], s["reason"]) for s in doc["skipped"]} == {
        (0, MiB, "unallocated"), (2 * MiB, 2 * MiB, "unallocated")}  # fmt: skip
    assert digest(base) == base_digest and base.stat().st_mtime_ns == base_mtime
    qemu_check(top)
    assert_punched(before, qemu_read(top, "qcow2", 0, 4 * MiB), [(MiB, MiB)])


@pytest.mark.parametrize(
    "args",
    [["--range", f"{8 * MiB - 4096}:8192"], ["--range", f"{8 * MiB}:1"], ["--range", "0:0"]],
)
def test_ranges_outside_the_disk_exit_2(full_qcow2: Path, capsys: Any, args: list[str]) -> None:
    d = digest(full_qcow2)
    code, _, err = cli(capsys, "image", "reclaim", str(full_qcow2), *args, "--json")
    assert code == 2 and "error" in err
    assert digest(full_qcow2) == d


@pytest.mark.parametrize("deep", [False, True])
def test_busy_image_exits_3_and_is_untouched(full_qcow2: Path, capsys: Any, deep: bool) -> None:
    d = digest(full_qcow2)
    with qemu_io_holding(full_qcow2, "qcow2"):
        code, _, err = cli(capsys, "image", "reclaim", str(full_qcow2), "--range", f"0:{MiB}",
                           *(["--deep"] if deep else []), "--json")  # fmt: skip
        assert code == 3, err
        assert "busy" in err
    assert digest(full_qcow2) == d


def test_dirty_image_is_refused_but_maps(tmp_path: Path, capsys: Any) -> None:
    img = qemu_img_create(tmp_path / "dirty.qcow2", 4 * MiB, lazy_refcounts=True)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "abort", img, check=False)
    d = digest(img)
    code, doc, _ = cli(capsys, "image", "map", str(img), "--json")
    assert code == 0 and doc[0]["kind"] in ("data", "shared")
    code, _, err = cli(capsys, "image", "reclaim", str(img), "--range", f"0:{MiB}", "--json")
    assert code == 4 and "dirty" in err
    assert digest(img) == d
    code, doc, _ = cli(capsys, "image", "info", str(img), "--json")
    assert doc["dirty"] is True


def test_corrupt_flag_is_refused(full_qcow2: Path, capsys: Any) -> None:
    with open(full_qcow2, "r+b") as f:
        f.seek(72)
        (incompat,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", incompat | 2))
    d = digest(full_qcow2)
    code, _, err = cli(capsys, "image", "reclaim", str(full_qcow2), "--range", f"0:{MiB}", "--json")
    assert code == 4 and "marked corrupt" in err
    assert digest(full_qcow2) == d


def test_data_mapped_onto_metadata_is_refused(tmp_path: Path, capsys: Any) -> None:
    """A hostile L2 entry that points a guest cluster at the L1 table: exit 4, no punch."""
    img = qemu_img_create(tmp_path / "evil.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 0 64k")
    with open_image(img) as image:
        l1_offset = image.header.l1_offset  # type: ignore[attr-defined]
        l2_offset = int(image.l1_tables()[0][1][0]) & 0x00FFFFFFFFFFFE00  # type: ignore[attr-defined]
    with open(img, "r+b") as f:
        f.seek(l2_offset)
        f.write(struct.pack(">Q", (1 << 63) | l1_offset))  # COPIED, host = the L1 table
    d = digest(img)
    code, _, err = cli(capsys, "image", "reclaim", str(img), "--range", f"0:{64 * KiB}", "--json")
    assert code == 4, err
    assert "metadata" in err or "refcount" in err or "overlap" in err
    assert digest(img) == d


def test_deep_mode_releases_clusters_so_qemu_reuses_them(full_qcow2: Path, capsys: Any) -> None:
    img = full_qcow2
    before = qemu_read(img, "qcow2", 0, 8 * MiB)
    size_before = img.stat().st_size
    code, doc, err = cli(capsys, "image", "reclaim", str(img), "--range", f"{MiB}:{2 * MiB + 4096}",
                         "--deep", "--json")  # fmt: skip
    assert code == 0, err
    assert doc["mode"] == "deep"
    assert doc["punched_bytes"] == 2 * MiB + 4096
    qemu_check(img)
    m = our_map(img)
    assert m.bytes_of(ExtentKind.ZERO) == 2 * MiB  # whole clusters now zero in the L2 tables
    assert_punched(before, qemu_read(img, "qcow2", 0, 8 * MiB), [(MiB, 2 * MiB + 4096)])
    # QEMU reuses the released clusters: new data does not grow the file.
    qemu_io(img, "write -P 9 1M 1M")
    assert img.stat().st_size == size_before
    qemu_check(img)


def test_deep_mode_is_refused_for_v2_with_backing(tmp_path: Path, capsys: Any) -> None:
    base = qemu_img_create(tmp_path / "b.qcow2", 4 * MiB, compat="0.10")
    top = qemu_img_create(tmp_path / "t.qcow2", 4 * MiB, compat="0.10", backing="b.qcow2")
    qemu_io(top, "write -P 1 0 1M")
    d = digest(top)
    code, _, err = cli(capsys, "image", "reclaim", str(top), "--range", f"0:{MiB}", "--deep", "--format",
                       "qcow2", "--json")  # fmt: skip
    assert code == 4 and "version 2 qcow2 image with a backing file" in err
    assert digest(top) == d and base.exists()


def test_api_reclaim_and_busy_refusal(full_qcow2: Path) -> None:
    with open_image(full_qcow2) as image:
        report = Pipeline().reclaim(make_disk(full_qcow2), image, RangeSet.from_ranges([(0, MiB)]))
    assert report.punched_bytes == MiB and report.freed_bytes == MiB
    qemu_check(full_qcow2)
    with qemu_io_holding(full_qcow2, "qcow2"), open_image(full_qcow2) as image, pytest.raises(ImageBusyError):
        Pipeline().reclaim(make_disk(full_qcow2), image, RangeSet.from_ranges([(2 * MiB, MiB)]))


def test_external_data_file_is_punched_and_locked(tmp_path: Path, capsys: Any) -> None:
    img = qemu_img_create(tmp_path / "x.qcow2", 4 * MiB, data_file=str(tmp_path / "x.raw"))
    qemu_io(img, "write -P 6 0 2M")
    qcow2_digest = digest(img)
    data = tmp_path / "x.raw"
    with qemu_io_holding(img, "qcow2"):  # QEMU locks the data file as well
        code, _, err = cli(
            capsys, "image", "reclaim", str(img), "--range", f"0:{MiB}", "--format", "qcow2", "--json"
        )
        assert code == 3, err
    code, doc, err = cli(capsys, "image", "reclaim", str(img), "--range", f"{64 * KiB}:{MiB}", "--format",
                         "qcow2", "--json")  # fmt: skip
    assert code == 0, err
    assert doc["punched_bytes"] == MiB and doc["freed_bytes"] > 0
    assert digest(img) == qcow2_digest  # the metadata file is never written
    content = data.read_bytes()
    assert content[64 * KiB : 64 * KiB + MiB] == bytes(MiB)
    assert content[: 64 * KiB] == b"\x06" * 64 * KiB and content[64 * KiB + MiB : 2 * MiB] == b"\x06" * (
        MiB - 64 * KiB
    )
    qemu_check(img)


# -- VHD -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_punch_vhd_inside_a_block(tmp_path: Path, capsys: Any, subformat: str) -> None:
    img = qemu_img_create(tmp_path / "d.vhd", 8 * MiB, "vpc", subformat=subformat)
    qemu_io(img, "write -P 3 0 6M", fmt="vpc")
    size = our_map(img, "vhd").lengths.sum()
    before = qemu_read(img, "vpc", 0, int(size))
    blocks = allocated(img)
    ranges = [f"--range={MiB + 8192}:4096", f"--range={4 * MiB}:{MiB}"]
    code, doc, err = cli(capsys, "image", "reclaim", str(img), "--format", "vpc", *ranges, "--json")
    assert code == 0, err
    # QEMU puts a dynamic block's data 512 bytes after its bitmap, so its host offsets
    # are not 4 KiB aligned: only whole host blocks inside the ranges can go.
    expect = punchable(img, [(MiB + 8192, 4096), (4 * MiB, MiB)])
    assert doc["punched_bytes"] == sum(n for _, n in expect)
    assert doc["punched_bytes"] >= (4096 + MiB if subformat == "fixed" else MiB - 4096)
    assert blocks - allocated(img) == doc["freed_bytes"] >= doc["punched_bytes"] - 8192
    assert_punched(before, qemu_read(img, "vpc", 0, int(size)), expect)
    with open_image(img, "vhd") as image:
        image.check_punchable()  # footer, header and BAT intact


def test_differencing_vhd_punches_the_child_never_the_parent(tmp_path: Path, capsys: Any) -> None:
    parent = qemu_img_create(tmp_path / "parent.vhd", 8 * MiB, "vpc")
    qemu_io(parent, "write -P 1 0 8M", fmt="vpc")
    with open_image(parent, "vhd") as p:
        size, parent_uid = p.virtual_size, p.footer.unique_id  # type: ignore[attr-defined]
    data = pattern(2 * MiB, 5)
    child = write_vhd(tmp_path / "child.vhd", VhdSpec(
        size=size, parent=parent, parent_uid=parent_uid, locators=[(W2RU, "parent.vhd".encode("utf-16-le"))],
        blocks={1: (bitmap_of(range(0, 2048)), data)}))  # fmt: skip
    parent_digest = digest(parent)
    with open_image(child, "vhd") as image:
        assert image.info()["backing"] == [str(parent)]
        # Sectors 0-2047 of block 1 are the child's, the rest of the block the parent's.
        assert image.read(2 * MiB, MiB) == data[:MiB]
        assert image.read(3 * MiB, MiB) == b"\x01" * MiB
    code, doc, err = cli(
        capsys, "image", "reclaim", str(child), "--range", f"0:{size}", "--format", "vhd", "--json"
    )
    assert code == 0, err
    expect = punchable(child, [(2 * MiB, MiB)])
    assert doc["punched_bytes"] == sum(n for _, n in expect) >= MiB - 4096
    assert digest(parent) == parent_digest
    with open_image(child, "vhd") as image:
        after = image.read(2 * MiB, 2 * MiB)
    assert_punched(data[:MiB] + b"\x01" * MiB, after, [(s - 2 * MiB, n) for s, n in expect])


def test_vhd_with_saved_state_is_refused(tmp_path: Path, capsys: Any) -> None:
    spec = VhdSpec(size=4 * MiB, saved_state=True, blocks={0: (b"\xff" * 512, pattern(2 * MiB, 1))})
    img = write_vhd(tmp_path / "saved.vhd", spec)
    d = digest(img)
    code, doc, _ = cli(capsys, "image", "map", str(img), "--json")
    assert code == 0 and doc[0]["kind"] == "data"
    code, _, err = cli(capsys, "image", "reclaim", str(img), "--range", f"0:{MiB}", "--json")
    assert code == 4 and "saved state" in err
    assert digest(img) == d


def test_vhd_has_no_deep_mode(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "d.vhd", 4 * MiB, "vpc")
    qemu_io(img, "write -P 3 0 1M", fmt="vpc")
    with open_image(img) as image, pytest.raises(UnsupportedImageError, match="deep"):
        Pipeline().reclaim(make_disk(img), image, RangeSet.from_ranges([(0, MiB)]), deep=True)


# -- every mode acts on the filtered plan (issue 11 item 7) ------------------------------------


class KeepOnly:
    """A hook plugin that vetoes every host byte but those of the guest range ``keep``
    (a stand-in for a site policy: "never touch this region")."""

    def __init__(self, keep: ByteRange | None) -> None:
        self.keep = keep

    @hookimpl
    def vmreclaim_translate_filter(self, image: Any, plan: ReclaimPlan) -> RangeSet:
        if self.keep is None:
            return RangeSet()
        return image.map(self.keep).select(ExtentKind.DATA).host_ranges()


@pytest.mark.parametrize("deep", [False, True], ids=["punch", "deep"])
def test_a_vetoing_plugin_holds_in_every_mode(full_qcow2: Path, deep: bool) -> None:
    """Asked for guest [0, 4M), a plugin keeps only [2M, 3M): the other 3 MiB read as
    before through QEMU (the deep discard must not release them either)."""
    img = full_qcow2
    before = qemu_read(img, "qcow2", 0, 8 * MiB)
    with open_image(img, "qcow2") as image:
        pipeline = Pipeline(Plugins([KeepOnly(ByteRange(2 * MiB, MiB))]))
        report = pipeline.reclaim(make_disk(img), image, RangeSet([0], [4 * MiB]), deep=deep)
    assert report.punched_bytes == MiB
    assert_punched(before, qemu_read(img, "qcow2", 0, 8 * MiB), [(2 * MiB, MiB)])
    qemu_check(img)
    if deep:
        assert our_map(img, "qcow2").bytes_of(ExtentKind.ZERO) == MiB


@pytest.mark.parametrize("deep", [False, True], ids=["punch", "deep"])
def test_a_plugin_that_vetoes_everything_leaves_the_image_unchanged(full_qcow2: Path, deep: bool) -> None:
    d = digest(full_qcow2)
    with open_image(full_qcow2, "qcow2") as image:
        pipeline = Pipeline(Plugins([KeepOnly(None)]))
        report = pipeline.reclaim(make_disk(full_qcow2), image, RangeSet([0], [4 * MiB]), deep=deep)
    assert report.punched_bytes == 0 and report.freed_bytes == 0
    assert digest(full_qcow2) == d
