"""Deleting files yields records covering exactly the blocks FIEMAP showed for them.

The agent runs as a real process (``vmreclaim agent --config``) against loop-mounted
ext4 and XFS; the other end is the test-side host of ``peer.py``. FIEMAP of each file,
taken before the delete, is the oracle.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent.conftest import LoopFs, MiB, agent_config, write_file
from tests.agent.peer import Conn, HostPeer, running_agent
from vmreclaim.core import protocol as p
from vmreclaim.core.ranges import RangeSet

pytestmark = [pytest.mark.root]


def records_after(conn: Conn, seq: int) -> RangeSet:
    out = RangeSet()
    for s, rec in list(conn.records.items()):
        if s > seq:
            out = out.union(RangeSet.from_ranges([tuple(r) for r in rec["ranges"]]))
    return out


def wait_cover(conn: Conn, seq: int, want: RangeSet, timeout: float = 20.0) -> RangeSet:
    """Records after ``seq`` once they cover ``want``, plus a quiet second for extras."""
    deadline = time.monotonic() + timeout
    while not records_after(conn, seq).contains(want):
        if time.monotonic() > deadline:
            got = records_after(conn, seq)
            raise AssertionError(f"records {got} do not cover {want}: missing {want.subtract(got)}")
        time.sleep(0.05)
    time.sleep(1.0)
    return records_after(conn, seq)


@contextlib.contextmanager
def connected(
    tmp_path: Path, peer: HostPeer, fs: LoopFs, capture: str = "fsmap", debounce: float = 0.2
) -> Iterator[tuple[Conn, int]]:
    """The agent running, welcomed, acked automatically, its initial report received:
    yields the connection and the last sequence number of the initial report."""
    config = agent_config(tmp_path, fs, capture={"driver": capture, "debounce_seconds": debounce})
    with running_agent(tmp_path, config) as agent:
        conn = peer.accept(agent=agent)
        hello = conn.handshake()
        assert hello.disks[0].id == "disk0" and hello.disks[0].verify == "getfsmap"
        conn.auto_ack = True
        agent.wait_log("already free at start")
        conn.expect(p.RecordMessage)
        time.sleep(0.3)
        yield conn, max(conn.records)


@pytest.mark.parametrize("capture", ["fsmap", "fiemap"])
@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_deletes_are_reported_exactly(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer, fstype: str, capture: str
) -> None:
    fs = loopfs(fstype)
    files = [
        write_file(fs.mount / f"f{i}", size, seed=i)
        for i, size in enumerate([4096, 100_000, 3 * MiB, 17 * MiB])
    ]
    shrink = write_file(fs.mount / "shrink", 8 * MiB, seed=9)
    rewrite = write_file(fs.mount / "rewrite", 6 * MiB, seed=10)
    keep = write_file(fs.mount / "keep", 2 * MiB, seed=11)
    with connected(tmp_path, peer, fs, capture) as (conn, seq):
        # The initial report is exactly the free space: nothing of the files in it.
        initial = records_after(conn, -1)
        assert not initial.intersect(fs.extents(*files, shrink, rewrite, keep))
        assert initial == fs.free()

        # 1. unlink: exactly the files' blocks.
        want = fs.extents(*files)
        for f in files:
            f.unlink()
        got = wait_cover(conn, seq, want)
        assert got == want, f"extra {got.subtract(want)}"
        seq = max(conn.records)

        # 2. truncate to a quarter: exactly the tail's blocks.
        before = fs.extents(shrink)
        os.truncate(shrink, 2 * MiB)
        want = before.subtract(fs.extents(shrink))
        assert want.total == 6 * MiB
        got = wait_cover(conn, seq, want)
        assert got == want, f"extra {got.subtract(want)}"
        seq = max(conn.records)

        # 3. overwrite with a shorter file: the old blocks, less any the new data reused.
        before = fs.extents(rewrite)
        write_file(rewrite, 1 * MiB, seed=12)
        want = before.subtract(fs.extents(rewrite))
        assert want.total >= 5 * MiB
        got = wait_cover(conn, seq, want)
        assert got == want, f"extra {got.subtract(want)}"
        # What was reported at each step is no block of a file alive then (the initial
        # report may hold blocks reused since: they were free when it was sent).
        assert not got.intersect(fs.extents(keep, shrink, rewrite))


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_rm_rf_of_a_tree_is_reported(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer, fstype: str
) -> None:
    fs = loopfs(fstype)
    top = fs.mount / "tree"
    for d in range(20):
        (top / f"d{d}" / "sub").mkdir(parents=True)
        for i in range(50):
            write_file(top / f"d{d}" / f"f{i}", 4096 * (1 + i % 5), seed=i)
            (top / f"d{d}" / "sub" / f"s{i}").write_bytes(b"x" * (1000 + i))
        write_file(top / f"d{d}" / "big", 2 * MiB, seed=d)
    os.sync()
    with connected(tmp_path, peer, fs) as (conn, seq):
        want = fs.tree_extents(top)
        subprocess.run(["rm", "-rf", str(top)], check=True)
        got = wait_cover(conn, seq, want)
        # Every block of every file, plus possibly directory blocks: all of it free now.
        assert fs.free().contains(got)
        assert got.subtract(want).total < 2 * MiB


def test_partition_offsets_are_added(tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer) -> None:
    """Records are virtual-disk bytes: the partition's start (sysfs, 512-byte units) added."""
    fs = loopfs("ext4", partition=True)
    assert fs.offset == 2049 * 512
    victim = write_file(fs.mount / "victim", 5 * MiB)
    with connected(tmp_path, peer, fs) as (conn, seq):
        disk_size = fs.image.stat().st_size
        want = fs.extents(victim)
        victim.unlink()
        got = wait_cover(conn, seq, want)
        assert got == want
        # Every reported byte lies inside the partition.
        assert got.bounds.start >= fs.offset and got.bounds.end <= disk_size


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_short_lived_files_are_reported(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer, fstype: str
) -> None:
    """Written, flushed and deleted well within one debounce delay (here 3 s): the blocks
    were free at the last pass and are free again at the next, yet the image holds their
    data. The driver's look at the allocator on each write event (``eager_writes``)
    makes them candidates again; without it nothing at all would be reported here."""
    fs = loopfs(fstype)
    with connected(tmp_path, peer, fs, debounce=3.0) as (conn, seq):
        want = RangeSet()
        for i in range(3):
            f = write_file(fs.mount / f"tmp{i}", 1 * MiB, seed=i)
            want = want.union(fs.extents(f))
            time.sleep(0.3)  # the agent sees the close of the write ...
            f.unlink()  # ... but no pass runs before the delete
        got = wait_cover(conn, seq, want)
        assert fs.free().contains(got)
