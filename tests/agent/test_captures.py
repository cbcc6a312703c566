"""Capture drivers and event sources, each end to end through a real agent process:
fanotify and inotify, the periodic scan alone, renames over files, and the FITRIM-only
fallback on a filesystem without GETFSMAP."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agent.conftest import LoopFs, MiB, agent_config, write_file
from tests.agent.peer import HostPeer, running_agent
from tests.agent.test_records import connected, wait_cover
from vmreclaim.core import protocol as p
from vmreclaim.core.captures import Capture, CaptureOptions
from vmreclaim.core.loader import driver_class, installed
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.plugins.captures.fsmap import FsmapCapture

pytestmark = [pytest.mark.root]


def test_both_drivers_are_installed_and_subclass_capture() -> None:
    names = {d.name for d in installed("captures")}
    assert {"fsmap", "fiemap"} <= names
    for name in ("fsmap", "fiemap"):
        cls = driver_class("captures", name)
        assert issubclass(cls, Capture) and issubclass(cls.Options, CaptureOptions)


@pytest.mark.parametrize(
    ("capture", "where"),
    [
        ({"driver": "fsmap", "events": "inotify"}, "inotify on"),
        ({"driver": "fiemap", "events": "inotify"}, "inotify on"),
        ({"driver": "fsmap", "events": "none", "scan_seconds": 1}, "no event source"),
    ],
)
def test_event_sources(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer, capture: dict[str, Any], where: str
) -> None:
    fs = loopfs("ext4")
    sub = fs.mount / "a" / "b"
    sub.mkdir(parents=True)
    old = write_file(sub / "old", 2 * MiB)
    config = agent_config(tmp_path, fs, capture={**capture, "debounce_seconds": 0.2})
    with running_agent(tmp_path, config) as agent:
        conn = peer.accept(agent=agent)
        conn.handshake()
        conn.auto_ack = True
        agent.wait_log(where)
        agent.wait_log("already free at start")
        conn.expect(p.RecordMessage)
        seq = max(conn.records)
        # A directory created after the start (inotify must add a watch for it).
        late = fs.mount / "late" / "deeper"
        late.mkdir(parents=True)
        new = write_file(late / "new", 3 * MiB, seed=2)
        # Without events only a scan sees the new file allocated: let one run.
        time.sleep(0.5 + capture.get("scan_seconds", 0) * 1.5)
        want = fs.extents(old, new)
        old.unlink()
        new.unlink()
        got = wait_cover(conn, seq, want)
        assert got == want


@pytest.mark.parametrize("capture", ["fsmap", "fiemap"])
def test_rename_over_a_file_reports_the_replaced_file(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer, capture: str
) -> None:
    """``mv new old``: no delete event names ``old``, yet its blocks are freed."""
    fs = loopfs("ext4")
    target = write_file(fs.mount / "config", 4 * MiB, seed=1)
    with connected(tmp_path, peer, fs, capture) as (conn, seq):
        staged = write_file(fs.mount / "config.tmp", 64 * 1024, seed=2)
        want = fs.extents(target)
        time.sleep(0.3)
        os.rename(staged, target)
        got = wait_cover(conn, seq, want)
        assert got == want
        assert not got.intersect(fs.extents(target))


def test_fsmap_driver_contract(tmp_path: Path, loopfs: Callable[..., LoopFs]) -> None:
    """The driver alone against a real target: candidates are what was not free at the
    last settle; a write event forgets what is allocated now."""
    from vmreclaim.agent.watched import WatchedFs
    from vmreclaim.core.captures import FsEvent, FsEventKind
    from vmreclaim.core.config import FilesystemEntry

    fs = loopfs("ext4")
    target = WatchedFs(FilesystemEntry(mount=fs.mount, disk="d"))
    try:
        drv = FsmapCapture()
        whole = ByteRange(0, target.size)
        target.commit()
        drv.begin(target, target.free_space())
        assert drv.candidates() == drv.known_free.complement(whole)
        f = write_file(fs.mount / "x", 1 * MiB)
        ext = fs.extents(f)
        assert drv.known_free.contains(ext)  # free at begin
        drv.observe([FsEvent(FsEventKind.WRITTEN, path=f)])
        assert not drv.known_free.intersect(ext) and drv.candidates().contains(ext)
        f.unlink()
        target.commit()
        free = target.free_space()
        drv.settle(whole, free)
        assert drv.known_free == free and not drv.candidates().intersect(ext)
        drv.settle(ByteRange(0, 4096), RangeSet())  # a window outside: the rest is kept
        assert drv.known_free == free.subtract(RangeSet.from_ranges([(0, 4096)]))
    finally:
        target.close()


def test_fitrim_only_fallback_on_a_filesystem_without_getfsmap(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    """btrfs has no GETFSMAP: the agent says so at start (log and hello), never sends a
    record for it, refuses fences on its disk, and trims it after deletions — which the
    loop device turns into holes in the image file."""
    fs = loopfs("btrfs")
    files = [write_file(fs.mount / f"f{i}", 4 * MiB, seed=i) for i in range(4)]
    os.sync()
    with running_agent(tmp_path, agent_config(tmp_path, fs)) as agent:
        conn = peer.accept(agent=agent)
        hello = conn.handshake()
        assert hello.disks[0].verify == "fitrim-only"
        assert "records" not in hello.capabilities
        agent.wait_log("no records from this filesystem")
        assert "no GETFSMAP" in agent.log
        before = fs.allocated()
        for f in files:
            f.unlink()
        deadline = time.monotonic() + 20
        while before - fs.allocated() < 12 * MiB:
            assert time.monotonic() < deadline, (
                f"image still {fs.allocated()} bytes (was {before}):\n{agent.log}"
            )
            time.sleep(0.1)
        agent.wait_log("FITRIM after deletions")
        conn.send(p.Fence(fence=1, disk="disk0", ranges=[[0, 4096]], lease_ms=1000))
        assert "GETFSMAP" in conn.expect(p.FenceRefused).error
        assert not conn.records
