"""Bad messages from the host get an ``error`` and never freeze or crash the agent.

Every hostile line is sent to a real agent process; after each one the test checks that
the filesystem still takes writes (nothing was frozen), that the agent still answers a
ping, and at the end that it is still the same process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent.conftest import LoopFs, agent_config
from tests.agent.peer import AgentProcess, Conn, HostPeer, running_agent
from vmreclaim.core import protocol as p
from vmreclaim.core.transports import MAX_LINE_BYTES

pytestmark = [pytest.mark.root]


@pytest.fixture
def session(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> Iterator[tuple[LoopFs, AgentProcess, Conn]]:
    fs = loopfs("ext4")
    with running_agent(tmp_path, agent_config(tmp_path, fs)) as agent:
        conn = peer.accept(agent=agent)
        yield fs, agent, conn


def still_fine(fs: LoopFs, conn: Conn, nonce: int) -> None:
    probe = fs.mount / f"probe{nonce}"
    start = time.monotonic()
    probe.write_bytes(b"x")  # would block on a frozen filesystem
    assert time.monotonic() - start < 2.0
    conn.send(p.Ping(nonce=nonce))
    assert conn.expect(p.Pong, timeout=10).nonce == nonce


def line(doc: object) -> bytes:
    return json.dumps(doc).encode() + b"\n"


HOSTILE: list[tuple[str, bytes, str | None]] = [
    ("garbage", b"\x00\xff garbage \x7f\n", None),
    ("not an object", b"[1, 2, 3]\n", None),
    ("no type", line({"fence": 1}), None),
    ("unknown type", line({"type": "format_disk", "disk": "disk0"}), "format_disk"),
    (
        "agent's own type",
        line({"type": "fence_ready", "fence": 1, "disk": "disk0", "ranges": [], "lease_ms": 1}),
        "fence_ready:1",
    ),
    ("extra key", line({"type": "ping", "nonce": 1, "rm": "-rf"}), "ping"),
    (
        "negative range",
        line({"type": "fence", "fence": 1, "disk": "disk0", "ranges": [[-4096, 4096]], "lease_ms": 1000}),
        "fence:1",
    ),
    (
        "empty range",
        line({"type": "fence", "fence": 1, "disk": "disk0", "ranges": [[0, 0]], "lease_ms": 1000}),
        "fence:1",
    ),
    (
        "overflowing range",
        line({"type": "fence", "fence": 1, "disk": "disk0", "ranges": [[2**63 - 2, 4096]], "lease_ms": 1000}),
        "fence:1",
    ),
    (
        "zero lease",
        line({"type": "fence", "fence": 1, "disk": "disk0", "ranges": [[0, 4096]], "lease_ms": 0}),
        "fence:1",
    ),
    (
        "huge lease",
        line({"type": "fence", "fence": 1, "disk": "disk0", "ranges": [[0, 4096]], "lease_ms": 10**9}),
        "fence:1",
    ),
    (
        "string fence id",
        line({"type": "fence", "fence": "1", "disk": "disk0", "ranges": [[0, 4096]], "lease_ms": 1000}),
        "fence",
    ),
    (
        "too many ranges",
        line(
            {"type": "trim", "fence": 2, "disk": "disk0", "ranges": [[i * 8192, 4096] for i in range(65537)]}
        ),
        "trim:2",
    ),
    ("float seq", line({"type": "ack", "seq": 1.5}), "ack"),
    ("unicode bomb", ('"' + "\u202e" * 1000 + '"\n').encode(), None),
]


def test_bad_lines_are_answered_with_error_before_and_after_welcome(
    session: tuple[LoopFs, AgentProcess, Conn],
) -> None:
    fs, agent, conn = session
    pid = agent.proc.pid if agent.proc else None
    # Before the welcome: a fence is refused (not acted on) and answered.
    conn.expect(p.Hello)
    conn.send(p.Fence(fence=1, disk="disk0", ranges=[[0, 4096]], lease_ms=5000))
    assert conn.expect(p.Error).ref == "fence:1"
    assert conn.expect(p.FenceRefused).fence == 1
    conn.send(p.Welcome(v=p.PROTOCOL_VERSION, vm="vm1", disks=[]))
    still_fine(fs, conn, 1)
    for n, (what, data, ref) in enumerate(HOSTILE, start=2):
        conn.send(data)
        err = conn.expect(p.Error, timeout=10)
        assert err.ref == ref, f"{what}: ref {err.ref!r}, error {err.error!r}"
        still_fine(fs, conn, n)
    # A fence for a disk the agent does not watch: error and a refusal, nothing frozen.
    conn.send(p.Fence(fence=3, disk="disk9", ranges=[[0, 4096]], lease_ms=5000))
    assert "disk9" in conn.expect(p.Error).error
    assert conn.expect(p.FenceRefused).fence == 3
    still_fine(fs, conn, 100)
    conn.send(p.Welcome(v=p.PROTOCOL_VERSION, vm="vm1", disks=[]))
    assert conn.expect(p.Error).ref == "welcome"
    assert agent.alive() and agent.proc is not None and agent.proc.pid == pid


def test_huge_lines_are_discarded_whole(session: tuple[LoopFs, AgentProcess, Conn]) -> None:
    fs, agent, conn = session
    conn.handshake()
    # Over the limit, with and without JSON inside, then a valid line right after it:
    # the tail of the long line must not be parsed as lines of its own.
    big = b'{"type": "ping", "nonce": 1, "pad": "' + b"A" * (MAX_LINE_BYTES + 100) + b'"}\n'
    conn.send(big + p.encode(p.Ping(nonce=77)))
    assert "discarded" in conn.expect(p.Error, timeout=20).error
    assert conn.expect(p.Pong, timeout=20).nonce == 77
    conn.send(b"B" * (3 * MAX_LINE_BYTES) + b"\n")
    assert "discarded" in conn.expect(p.Error, timeout=30).error
    still_fine(fs, conn, 78)
    # No error answered more than once per bad line: exactly two errors so far.
    errors = [m for m in conn.lines if b'"type":"error"' in m]
    assert len(errors) == 2
    assert agent.alive()


def test_wrong_protocol_version_disconnects_and_retries(
    session: tuple[LoopFs, AgentProcess, Conn], peer: HostPeer
) -> None:
    fs, agent, conn = session
    conn.expect(p.Hello)
    conn.send(p.Welcome(v=99, vm="vm1", disks=[]))
    assert conn.recv(timeout=10) is None  # the agent closed the channel
    agent.wait_log("protocol version 99")
    conn2 = peer.accept(agent=agent)  # and comes back
    conn2.handshake()
    still_fine(fs, conn2, 5)
