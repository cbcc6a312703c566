"""Fences freeze, re-verify under the freeze, and always thaw.

A writer process that creates a file on the watched filesystem is the probe: it blocks
while the filesystem is frozen and finishes once it is thawed. Every way a fence can
end is exercised: ``release``, the lease, the host disappearing, the agent killed
(-9) or stopped (SIGSTOP: loop and watchdog thread both stuck, the guardian acts), and
the watchdog thread alone with no event loop at all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.agent.conftest import LoopFs, MiB, agent_config, write_file
from tests.agent.peer import AgentProcess, Conn, HostPeer, running_agent
from vmreclaim.agent.fence import FenceKeeper, FenceState
from vmreclaim.agent.watched import WatchedFs
from vmreclaim.core import protocol as p
from vmreclaim.core.config import FilesystemEntry
from vmreclaim.core.ranges import RangeSet

pytestmark = [pytest.mark.root]


class Writer:
    """A process that writes and fsyncs a new file: blocked while the fs is frozen."""

    def __init__(self, path: Path) -> None:
        code = "import os,sys; f=open(sys.argv[1],'w'); f.write('x'); f.flush(); os.fsync(f.fileno())"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)])

    def blocked_for(self, seconds: float) -> bool:
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return True
        return False

    def done_within(self, seconds: float) -> float:
        start = time.monotonic()
        self.proc.wait(timeout=seconds)
        assert self.proc.returncode == 0
        return time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@contextmanager
def fenced_setup(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer, **extra: Any
) -> Iterator[tuple[LoopFs, AgentProcess, Conn]]:
    fs = loopfs("ext4")
    config = agent_config(tmp_path, fs, **extra)
    with running_agent(tmp_path, config) as agent:
        conn = peer.accept(agent=agent)
        conn.handshake()
        conn.auto_ack = True
        agent.wait_log("already free at start")
        yield fs, agent, conn


def fence(conn: Conn, fence_id: int, ranges: Any, lease_ms: int) -> p.FenceReady:
    conn.send(p.Fence(fence=fence_id, disk="disk0", ranges=ranges, lease_ms=lease_ms))
    ready: p.FenceReady = conn.expect(p.FenceReady, where=lambda m: m.fence == fence_id)
    return ready


def test_fence_freezes_reverifies_and_release_thaws(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    with fenced_setup(tmp_path, loopfs, peer) as (fs, _agent, conn):
        live = write_file(fs.mount / "live", 3 * MiB)
        dead = write_file(fs.mount / "dead", 2 * MiB, seed=1)
        dead_ext = fs.extents(dead)
        dead.unlink()
        asked = dead_ext.union(fs.extents(live))
        ready = fence(conn, 1, p.ranges_to_pairs(asked), 8000)
        got = p.pairs_to_ranges(ready.ranges)
        # Under the freeze: the dead file's blocks are free, the live file's are not.
        assert got == dead_ext, f"{got} != {dead_ext}"
        assert ready.lease_ms == 8000
        writer = Writer(fs.mount / "probe")
        try:
            assert writer.blocked_for(1.0), "a write went through a frozen filesystem"
            conn.send(p.Release(fence=1))
            released = conn.expect(p.Released)
            assert (released.fence, released.why) == (1, "release")
            writer.done_within(5)
        finally:
            writer.kill()
        # A second release is answered idempotently; an unknown one is an error.
        conn.send(p.Release(fence=1))
        assert conn.expect(p.Released).why == "already-released"
        conn.send(p.Release(fence=99))
        assert conn.expect(p.Error).ref == "release:99"


def test_lease_runs_out_and_thaws_without_release(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    with fenced_setup(tmp_path, loopfs, peer, fence_max_lease_seconds=1.5) as (fs, _agent, conn):
        sent = time.monotonic()
        # The host asks for 20 s; the agent caps it at its own 1.5 s and says so.
        ready = fence(conn, 2, [[0, 1 * MiB]], 20000)
        assert ready.lease_ms == 1500
        writer = Writer(fs.mount / "probe")
        try:
            released = conn.expect(p.Released, timeout=10)
            assert (released.fence, released.why) == (2, "lease")
            elapsed = time.monotonic() - sent
            assert 1.0 < elapsed < 4.0, elapsed
            writer.done_within(5)
        finally:
            writer.kill()


def test_host_gone_mid_fence_thaws_at_once(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    with fenced_setup(tmp_path, loopfs, peer, fence_max_lease_seconds=30) as (fs, agent, conn):
        fence(conn, 3, [[0, 1 * MiB]], 30000)
        writer = Writer(fs.mount / "probe")
        try:
            assert writer.blocked_for(0.5)
            conn.close()  # the host dies with the filesystem frozen
            assert writer.done_within(5) < 3.0  # long before the 30 s lease
        finally:
            writer.kill()
        agent.wait_log("thawed: the channel closed")
        # The agent reconnects and goes on.
        conn = peer.accept(agent=agent)
        conn.handshake()
        conn.send(p.Ping(nonce=5))
        assert conn.expect(p.Pong).nonce == 5


def test_agent_killed_mid_fence_guardian_thaws(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    with fenced_setup(tmp_path, loopfs, peer, fence_max_lease_seconds=30) as (fs, agent, conn):
        fence(conn, 4, [[0, 1 * MiB]], 30000)
        writer = Writer(fs.mount / "probe")
        try:
            assert writer.blocked_for(0.5)
            agent.kill9()
            assert writer.done_within(10) < 5.0  # the guardian saw its pipe close
        finally:
            writer.kill()


def test_agent_stopped_mid_fence_thaws_and_exits_0(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    with fenced_setup(tmp_path, loopfs, peer, fence_max_lease_seconds=30) as (fs, agent, conn):
        fence(conn, 6, [[0, 1 * MiB]], 30000)
        writer = Writer(fs.mount / "probe")
        try:
            assert writer.blocked_for(0.5)
            assert agent.stop() == 0  # SIGTERM
            writer.done_within(5)
        finally:
            writer.kill()


def test_agent_stuck_mid_fence_guardian_thaws_at_the_deadline(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    """SIGSTOP stops the event loop and the watchdog thread alike: the guardian process
    thaws shortly after the deadline; resumed, the agent reports the lease ran out."""
    with fenced_setup(tmp_path, loopfs, peer, fence_max_lease_seconds=2) as (fs, agent, conn):
        assert agent.proc is not None
        fence(conn, 5, [[0, 1 * MiB]], 2000)
        agent.proc.send_signal(signal.SIGSTOP)
        writer = Writer(fs.mount / "probe")
        try:
            took = writer.done_within(10)
            assert took < 5.0
        finally:
            writer.kill()
            agent.proc.send_signal(signal.SIGCONT)
        released = conn.expect(p.Released, timeout=10)
        assert (released.fence, released.why) == (5, "lease")
        conn.send(p.Ping(nonce=6))
        assert conn.expect(p.Pong).nonce == 6


def test_watchdog_thread_thaws_with_no_event_loop(tmp_path: Path, loopfs: Callable[..., LoopFs]) -> None:
    """The keeper's thread alone thaws at the deadline: nothing else runs here."""
    fs = loopfs("ext4")
    watched = WatchedFs(FilesystemEntry(mount=fs.mount, disk="disk0"))
    expired: list[FenceState] = []
    keeper = FenceKeeper(on_expired=expired.append, hold=lambda: None, release=lambda: None)
    try:
        state = keeper.begin(7, "disk0", [watched], time.monotonic() + 1.0, 1000, owner=None)
        keeper.freeze(state)
        writer = Writer(fs.mount / "probe")
        try:
            assert writer.blocked_for(0.5)
            writer.done_within(5)
        finally:
            writer.kill()
        assert expired == [state] and state.why == "lease"
        # Ending it afterwards is harmless: nothing is thawed twice.
        assert keeper.finish(state, "release") is False
    finally:
        keeper.close()
        watched.close()


def test_refused_freeze_leaves_nothing_frozen(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    """A filesystem frozen by someone else (fsfreeze) is never thawed by the agent."""
    with fenced_setup(tmp_path, loopfs, peer) as (fs, _agent, conn):
        subprocess.run(["fsfreeze", "-f", str(fs.mount)], check=True)
        try:
            conn.send(p.Fence(fence=8, disk="disk0", ranges=[[0, 4096]], lease_ms=1000))
            refused = conn.expect(p.FenceRefused)
            assert "already frozen" in refused.error
            time.sleep(1.5)  # past the lease: the agent must not have thawed it
            writer = Writer(fs.mount / "probe")
            assert writer.blocked_for(0.5), "the agent thawed a freeze that was not its own"
        finally:
            subprocess.run(["fsfreeze", "-u", str(fs.mount)], check=True)
        writer.done_within(5)


def test_nothing_is_written_to_a_frozen_filesystem(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    """Spool and log on the frozen filesystem itself: the agent keeps working from memory
    during the fence (a record verified under the freeze is sent, pings answered, a bad
    line answered and logged), and writes its spool after the thaw."""
    fs = loopfs("ext4")
    config = agent_config(tmp_path, fs, spool=str(fs.mount / "spool"), fence_max_lease_seconds=30)
    agent = AgentProcess(tmp_path, config)
    agent.log_path = fs.mount / "agent.log"  # stderr on the filesystem that gets frozen
    agent.start()
    try:
        conn = peer.accept(agent=agent)
        conn.handshake()
        conn.auto_ack = True
        agent.wait_log("already free at start")
        victim = write_file(fs.mount / "victim", 4 * MiB)
        want = fs.extents(victim)
        spool_db = fs.mount / "spool" / "spool.sqlite"
        time.sleep(0.5)
        victim.unlink()
        # Fence at once: the pass for the delete runs while the filesystem is frozen.
        ready = fence(conn, 9, [[0, 4096]], 30000)
        assert ready.fence == 9
        record = conn.expect(p.RecordMessage, timeout=10, where=lambda m: m.record["bytes"] == want.total)
        conn.send(b"not json\n")
        assert conn.expect(p.Error, timeout=5)
        conn.send(p.Ping(nonce=11))
        assert conn.expect(p.Pong, timeout=5).nonce == 11
        seq = record.record["seq"]
        conn.auto_ack = False
        conn.send(p.Release(fence=9))
        assert conn.expect(p.Released).why == "release"
        agent.wait_log("host message refused")  # the held log line reached the file
        # After the thaw the spool catches up: its sequence counter passes the record.
        deadline = time.monotonic() + 10
        while True:
            with contextlib.closing(sqlite3.connect(spool_db)) as db:
                (nseq,) = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            if nseq > seq or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert nseq > seq
    finally:
        agent.stop()


def test_trim_runs_fitrim_on_the_ranges(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    """Guest-trim mode. The loop device passes discards to its file as hole punches, so
    the image file shows what the kernel trimmed: the asked range, and never a block of
    a live file. (ext4 trims a free run that starts inside the range to its end:
    the kernel may discard more free space than asked, never used space.)"""
    with fenced_setup(tmp_path, loopfs, peer) as (fs, _agent, conn):
        keep = write_file(fs.mount / "keep", 4 * MiB, seed=3)
        a = write_file(fs.mount / "a", 4 * MiB, seed=1)
        a_ext, keep_ext = fs.extents(a), fs.extents(keep)
        a.unlink()
        os.sync()
        before = holes(fs.image)
        conn.send(p.Trim(fence=10, disk="disk0", ranges=p.ranges_to_pairs(a_ext)))
        done = conn.expect(p.TrimDone)
        assert done.error is None and done.trimmed_bytes >= a_ext.total
        new = holes(fs.image).subtract(before)
        # Nearly all of it: the kernel trims per block group and may leave a group's
        # first blocks (and the host file's blocks are 4 KiB, the guest's 1 KiB).
        assert new.intersect(a_ext).total >= 0.95 * a_ext.total
        assert not new.intersect(keep_ext)
        assert fs.free().contains(new.align_inward(4096))
        conn.send(p.Trim(fence=11, disk="nope", ranges=[[0, 4096]]))
        assert conn.expect(p.TrimDone).error


def holes(path: Path) -> RangeSet:
    """The holes of a sparse file (SEEK_DATA / SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                out.append((off, size - off))
                break
            if data > off:
                out.append((off, data - off))
            off = os.lseek(fd, data, os.SEEK_HOLE)
    finally:
        os.close(fd)
    return RangeSet.from_ranges(out)


def test_two_fences_one_disk_refused_other_ok(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    with fenced_setup(tmp_path, loopfs, peer) as (_fs, _agent, conn):
        fence(conn, 12, [[0, 4096]], 5000)
        conn.send(p.Fence(fence=13, disk="disk0", ranges=[[0, 4096]], lease_ms=5000))
        assert "already fenced" in conn.expect(p.FenceRefused).error
        conn.send(p.Release(fence=12))
        conn.expect(p.Released)
        assert fence(conn, 14, [[0, 4096]], 5000).fence == 14
        conn.send(p.Release(fence=14))
        conn.expect(p.Released)
