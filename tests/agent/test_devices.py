"""From filesystem device bytes to virtual-disk bytes: partitions and device-mapper.

Partitions are tested on real loop devices. Device-mapper needs ``dm-mod``, which the
reference machine's kernel lacks, so stacks with it are tested on a copy of the sysfs
layout the kernel would show (``/sys/dev/block/MAJ:MIN`` links, ``dev``, ``size``,
``partition``, ``start``, ``dm/name``) and the table DM_TABLE_STATUS would return.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.agent.conftest import LoopFs
from vmreclaim.agent.devices import (
    Disk,
    DiskMap,
    Segment,
    Topology,
    _parse_mountinfo,
    _TopologyError,
    find_mount,
)
from vmreclaim.agent.linux import DmTarget
from vmreclaim.core.ranges import RangeSet

SECTOR = 512


class FakeSysfs:
    """A sysfs tree of block devices under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tables: dict[str, list[DmTarget]] = {}
        (root / "dev" / "block").mkdir(parents=True)

    def device(self, path: str, major: int, minor: int, sectors: int, **files: str) -> Path:
        d = self.root / "devices" / path
        d.mkdir(parents=True)
        (d / "dev").write_text(f"{major}:{minor}\n")
        (d / "size").write_text(f"{sectors}\n")
        for name, value in files.items():
            f = d / name.replace("__", "/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(value + "\n")
        (self.root / "dev" / "block" / f"{major}:{minor}").symlink_to(d)
        return d

    def dm(self, name: str, minor: int, targets: list[tuple[int, int, str, str]]) -> int:
        sectors = sum(t[1] for t in targets)
        self.device(f"virtual/block/dm-{minor}", 253, minor, sectors, dm__name=name)
        self.tables[name] = [DmTarget(s, n, t, params) for s, n, t, params in targets]
        return os.makedev(253, minor)

    def topology(self) -> Topology:
        return Topology(self.root, dm_table=lambda name: self.tables[name])


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    fake = FakeSysfs(tmp_path / "sys")
    disk = "pci0000:00/0000:00:04.0/virtio1/block/vda"
    fake.device(disk, 252, 0, 2_000_000, serial="disk0", queue__discard_max_bytes="2147483136")
    fake.device(disk + "/vda1", 252, 1, 2048, partition="1", start="2048")
    fake.device(disk + "/vda2", 252, 2, 1_000_000, partition="2", start="4096")
    fake.device("pci0000:00/0000:00:05.0/virtio2/block/vdb", 252, 16, 100_000, serial="disk1")
    return fake


def test_partition_start_is_in_512_byte_units(sysfs: FakeSysfs) -> None:
    m = sysfs.topology().map_device(os.makedev(252, 2))
    assert m.disk == Disk("vda", 2_000_000 * SECTOR, "disk0", True)
    assert m.segments == (Segment(0, 1_000_000 * SECTOR, 4096 * SECTOR),)
    assert m.path == "vda2 (+2097152) → vda"
    r = RangeSet.from_ranges([(0, 4096), (10 * SECTOR, 8192)])
    assert m.to_disk(r) == r.shift(4096 * SECTOR)
    assert m.to_device(m.to_disk(r)) == r


def test_lvm_linear_segments_out_of_order_on_a_partition(sysfs: FakeSysfs) -> None:
    # An LV whose first 1000 sectors sit at vda2+5000, the next 500 at vda2+100.
    dev = sysfs.dm("vg-lv", 0, [(0, 1000, "linear", "252:2 5000"), (1000, 500, "linear", "252:2 100")])
    m = sysfs.topology().map_device(dev)
    base = 4096 * SECTOR
    assert m.disk.name == "vda"
    assert m.segments == (
        Segment(0, 1000 * SECTOR, base + 5000 * SECTOR),
        Segment(1000 * SECTOR, 500 * SECTOR, base + 100 * SECTOR),
    )
    # A range across the segment boundary splits in two on the disk.
    r = RangeSet.from_ranges([(999 * SECTOR, 2 * SECTOR)])
    assert m.to_disk(r) == RangeSet.from_ranges(
        [(base + 5999 * SECTOR, SECTOR), (base + 100 * SECTOR, SECTOR)]
    )
    assert m.to_device(m.to_disk(r)) == r
    # Disk bytes outside the LV (the partition table, other partitions) map to nothing.
    assert not m.to_device(RangeSet.from_ranges([(0, base)]))
    assert "dm-0 (vg-lv)" in m.path and m.path.endswith("vda")


def test_dm_on_dm_on_partition(sysfs: FakeSysfs) -> None:
    sysfs.dm("inner", 1, [(0, 4000, "linear", "252:2 1000")])
    dev = sysfs.dm("outer", 2, [(0, 2000, "linear", "253:1 1500")])
    m = sysfs.topology().map_device(dev)
    assert m.segments == (Segment(0, 2000 * SECTOR, (4096 + 1000 + 1500) * SECTOR),)


def test_refused_stacks_name_the_reason(sysfs: FakeSysfs) -> None:
    topo = sysfs.topology()
    crypt = sysfs.dm("secret", 3, [(0, 1000, "crypt", "aes-xts-plain64 :64:logon:k 0 252:2 4096")])
    with pytest.raises(_TopologyError, match="'crypt' target"):
        topo.map_device(crypt)
    spread = sysfs.dm("spread", 4, [(0, 1000, "linear", "252:2 0"), (1000, 1000, "linear", "252:16 0")])
    with pytest.raises(_TopologyError, match="spans several disks"):
        topo.map_device(spread)
    bad = sysfs.dm("bad", 5, [(0, 1000, "linear", "/dev/vda2 0")])
    with pytest.raises(_TopologyError, match="MAJ:MIN OFFSET"):
        topo.map_device(bad)
    with pytest.raises(_TopologyError, match="not a block device"):
        topo.map_device(os.makedev(0, 42))


def test_table_that_does_not_cover_the_device_is_refused(sysfs: FakeSysfs) -> None:
    sysfs.device("virtual/block/dm-6", 253, 6, 3000, dm__name="short")
    sysfs.tables["short"] = [DmTarget(0, 1000, "linear", "252:2 0")]
    with pytest.raises(_TopologyError, match="unmapped"):
        sysfs.topology().map_device(os.makedev(253, 6))


@given(
    st.lists(st.tuples(st.integers(1, 64), st.integers(0, 1000)), min_size=1, max_size=8),
    st.lists(st.tuples(st.integers(0, 20000), st.integers(1, 5000)), max_size=10),
)
def test_maps_round_trip(segments: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> None:
    """Device → disk → device is the identity on mapped bytes and keeps byte counts."""
    segs, at, used = [], 0, 0
    for length, gap in segments:
        segs.append(Segment(at, length * SECTOR, used + gap * SECTOR))
        at += length * SECTOR
        used += gap * SECTOR + length * SECTOR
    m = DiskMap("/dev/x", at, Disk("x", used, None, False), tuple(segs), "x")
    r = RangeSet.from_ranges(ranges).clip(RangeSet.from_ranges([(0, at)]).bounds)
    on_disk = m.to_disk(r)
    assert on_disk.total == r.total
    assert m.to_device(on_disk) == r


@pytest.mark.root
def test_real_loop_partition(loopfs: Callable[..., LoopFs]) -> None:
    fs = loopfs("ext4", partition=True)
    m = Topology().map_device(os.stat(fs.mount).st_dev)
    assert m.disk.name == fs.disk.name
    assert m.segments[0].disk_start == 2049 * SECTOR == fs.offset
    assert m.disk.size == fs.image.stat().st_size


def test_mountinfo_lines() -> None:
    line = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext4 /dev/vd\\134a1 rw,errors=continue\n"
    info = _parse_mountinfo(line)
    assert info is not None
    assert info.mount == Path("/mnt/with space")
    assert info.dev == os.makedev(98, 0)
    assert (info.fstype, info.source) == ("ext4", "/dev/vd\\a1")
    assert _parse_mountinfo("garbage\n") is None
    assert find_mount(Path("/proc/self")).fstype == "proc"
