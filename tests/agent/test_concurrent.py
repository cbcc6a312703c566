"""A writer creating, rewriting, truncating and deleting files while the agent reports
and the host fences: a fenced range is never a block a live file occupies.

Every round the host fences the disk asking for *every* range ever reported (many of
them reused by the writer since), and while the filesystem is frozen compares the
answer with FIEMAP of every live file. Records themselves are checked the same way once
the writer has stopped (while it runs, a record is only "free when verified").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent.conftest import LoopFs, agent_config
from tests.agent.peer import HostPeer, running_agent
from vmreclaim.core import protocol as p
from vmreclaim.core.ranges import RangeSet

pytestmark = [pytest.mark.root]

WRITER = r"""
import os, random, sys, time
top = sys.argv[1]
rng = random.Random(int(sys.argv[2]))
live = []
n = 0
while not os.path.exists(os.path.join(top, "..", "stop")):
    op = rng.random()
    if op < 0.45 or len(live) < 5:
        n += 1
        path = os.path.join(top, "f%d" % n)
        with open(path, "wb") as f:
            f.write(os.urandom(rng.choice([4096, 20000, 300000, 1500000])))
            if rng.random() < 0.5:
                os.fsync(f.fileno())
        live.append(path)
    elif op < 0.75:
        os.unlink(live.pop(rng.randrange(len(live))))
    elif op < 0.88:
        os.truncate(rng.choice(live), rng.choice([0, 4096, 10000]))
    else:
        with open(rng.choice(live), "wb") as f:
            f.write(os.urandom(rng.choice([100, 8192])))
    time.sleep(rng.random() * 0.004)
"""


def live_extents(fs: LoopFs, top: Path) -> RangeSet:
    files = []
    with os.scandir(top) as it:
        for entry in it:
            files.append(Path(entry.path))
    out = RangeSet()
    for f in files:
        try:
            out = out.union(fs.extents(f))
        except FileNotFoundError:
            continue  # deleted before the freeze; not live
    return out


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_reported_ranges_never_hold_live_files(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer, fstype: str
) -> None:
    fs = loopfs(fstype)
    top = fs.mount / "work"
    top.mkdir()
    config = agent_config(
        tmp_path, fs, capture={"driver": "fsmap", "debounce_seconds": 0.1, "max_delay_seconds": 0.5}
    )
    with running_agent(tmp_path, config) as agent:
        conn = peer.accept(agent=agent)
        conn.handshake()
        conn.auto_ack = True
        conn.expect(p.RecordMessage)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(top), "7"])
        try:
            fenced_bytes = 0
            rounds = 0
            deadline = time.monotonic() + 8
            while rounds < 25 and time.monotonic() < deadline:
                time.sleep(0.15)
                asked = conn.ranges()
                conn.send(
                    p.Fence(fence=rounds, disk="disk0", ranges=p.ranges_to_pairs(asked), lease_ms=10000)
                )
                ready = conn.expect(p.FenceReady, where=lambda m, r=rounds: m.fence == r)
                free = p.pairs_to_ranges(ready.ranges)
                assert asked.contains(free)
                # Frozen: the writer is blocked, every file's blocks are allocated.
                live = live_extents(fs, top)
                clash = free.intersect(live)
                assert not clash, f"round {rounds}: fenced-free ranges {clash} hold live file data"
                fenced_bytes += free.total
                conn.send(p.Release(fence=rounds))
                conn.expect(p.Released, where=lambda m, r=rounds: m.fence == r)
                rounds += 1
            assert rounds >= 10, f"only {rounds} rounds"
            assert writer.poll() is None, "the writer died"
        finally:
            (fs.mount / "stop").touch()
            writer.wait(timeout=30)
        # Quiet now: a pass after this point sees a filesystem no one is changing.
        time.sleep(1.5)
        mark = max(conn.records)
        victim = max(top.iterdir(), key=lambda f: fs.extents(f).total)
        gone = fs.extents(victim)
        assert gone
        victim.unlink()
        deadline = time.monotonic() + 15
        while not conn.ranges().intersect(gone) or max(conn.records) == mark:
            assert time.monotonic() < deadline, "no record after the writer stopped"
            time.sleep(0.05)
        time.sleep(0.5)
        settled = RangeSet()
        for seq, rec in list(conn.records.items()):
            if seq > mark:
                settled = settled.union(RangeSet.from_ranges([tuple(r) for r in rec["ranges"]]))
        assert settled.contains(gone)
        assert not settled.intersect(live_extents(fs, top))
        assert fs.free().contains(settled)
        assert fenced_bytes > 0
        assert len(conn.records) > 5, "the writer's deletes were not reported"
