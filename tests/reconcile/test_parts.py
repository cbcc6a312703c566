"""Reconciliation's two halves on real parts: the agent's whole free space of a
loop-mounted filesystem (through a partition at an odd sector), the wire encoding, and
the host's intersection with raw and qcow2 images (``qemu-img map`` and ``dumpe2fs`` as
oracles)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent.conftest import LoopFs
from vmreclaim.agent import linux
from vmreclaim.agent.reconcile import free_space_of, reconcile_disk
from vmreclaim.agent.watched import WatchedFs
from vmreclaim.core import freespace
from vmreclaim.core.config import FilesystemEntry
from vmreclaim.core.opening import open_image
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.ranges import RangeSet
from vmreclaim.host.reconcile import RECONCILE_FS, as_records, intersect
from vmreclaim.testing import require_tool, run

MiB = 1 << 20


def write(path: Path, size: int, fill: int) -> None:
    with open(path, "wb") as f:
        f.write(bytes([fill]) * size)
        f.flush()
        os.fsync(f.fileno())


def dumpe2fs_free(device: Path, offset: int) -> RangeSet:
    """Free blocks per ``dumpe2fs`` (the filesystem's own bitmaps), disk bytes."""
    out = run(["dumpe2fs", str(device)])
    block = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    pairs = []
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("Free blocks: "):
            continue
        for part in line[len("Free blocks: ") :].split(","):
            part = part.strip()
            if not part:
                continue
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            pairs.append((offset + first * block, (last - first + 1) * block))
    return RangeSet.from_ranges(pairs)


@pytest.mark.root
@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_whole_free_space_in_disk_bytes(loopfs: Callable[..., LoopFs], fstype: str) -> None:
    fs = loopfs(fstype, partition=True)
    write(fs.mount / "keep", 8 * MiB, 1)
    write(fs.mount / "gone", 16 * MiB, 2)
    gone = fs.extents(fs.mount / "gone")
    keep = fs.extents(fs.mount / "keep")
    os.unlink(fs.mount / "gone")
    watched = WatchedFs(FilesystemEntry(mount=fs.mount, disk="disk0"))
    try:
        free = free_space_of([watched], Pipeline())
        report = reconcile_disk("disk0", [watched], Pipeline())
    finally:
        watched.close()
    assert free.contains(gone), "the deleted file's blocks are free (through the partition offset)"
    assert not free.intersect(keep), "a live file's blocks are never reported"
    assert free == fs.free()
    # The whole-filesystem batch and a tiny one (many resumed calls) agree.
    fd = os.open(fs.mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dev = os.fstat(fd).st_dev
        tiny = linux.free_space(fd, dev, 0, 2**62, batch=3)
        assert tiny == linux.free_space(fd, dev, 0, 2**62, batch=linux.FSMAP_WHOLE_BATCH) and len(tiny) > 3
    finally:
        os.close(fd)
    assert report.mounts == [str(fs.mount)] and not report.encoded.partial
    # The partition starts at sector 2049: the unit falls to 512 and nothing is lost.
    assert report.encoded.chunks[0].unit == 512
    size = fs.image.stat().st_size
    assert freespace.decode(report.encoded.chunks, disk="disk0", disk_size=size) == free
    if fstype == "ext4":
        umount_free = dumpe2fs_free(fs.device, fs.offset)
        # dumpe2fs reads the on-disk bitmaps, which GETFSMAP's committed answer matches.
        assert free == umount_free

    # Host half: a raw image holds every byte it was written with; the file just
    # deleted is reclaimable, the live one is not.
    with open_image(fs.image, "raw") as image:
        result = intersect(image, free)
    assert result.reclaimable.contains(gone)
    assert not result.reclaimable.intersect(keep)
    assert free.contains(result.reclaimable)
    records = as_records("vm1", "disk0", result.reclaimable)
    assert all(r.fs == RECONCILE_FS and len(r.ranges) <= 16_384 for r in records)
    assert sum(r.bytes for r in records) == result.reclaimable.total


@pytest.mark.qemu
def test_intersection_with_a_qcow2_matches_qemu_img_map(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    image = tmp_path / "d.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(image), "64M"])
    cmds = []
    for i in range(0, 64, 3):
        cmds += ["-c", f"write -P {i + 1} {i}M 512k"]
    cmds += ["-c", "write -z 9M 1M"]  # a zero cluster: nothing to free there
    run(["qemu-io", "-f", "qcow2", *cmds, str(image)])
    free = RangeSet([0, 20 * MiB + 4096], [12 * MiB, 40 * MiB])
    with open_image(image, "qcow2") as img:
        result = intersect(img, free)
    rows = json.loads(run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)]))
    data = RangeSet.from_ranges(
        (r["start"], r["length"]) for r in rows if r["data"] and not r.get("zero", False) and r["depth"] == 0
    )
    assert result.reclaimable == data.intersect(free)
    assert result.reclaimable and result.virtual_bytes == 64 * MiB
