"""The spool: bounded, durable across restarts and kill -9, cleared by acknowledgements."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent.conftest import LoopFs, MiB, agent_config, write_file
from tests.agent.peer import AgentProcess, HostPeer
from vmreclaim.agent.spool import Spool
from vmreclaim.core import protocol as p
from vmreclaim.core.errors import AgentSetupError


def test_records_survive_reopen_and_seqs_are_never_reused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 * MiB)
    for i in range(5):
        spool.add(spool.reserve(), "disk0", b"line %d\n" % i)
    spool.remove(1)
    spool.remove(3)
    assert spool.remove(3) is False
    assert spool.wait_synced()
    spool.close()
    spool = Spool(tmp_path / "s", max_bytes=1 * MiB)
    assert list(spool.pending) == [0, 2, 4]
    assert spool.pending[2] == ("disk0", b"line 2\n")
    for seq in (0, 2, 4):
        spool.remove(seq)
    assert spool.wait_synced()
    spool.close()
    spool = Spool(tmp_path / "s", max_bytes=1 * MiB)
    assert not spool.pending
    assert spool.reserve() == 5  # everything was acked, yet 0..4 are never handed out again
    spool.close()


def test_bound_drops_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 * MiB)
    line = b"x" * (300 * 1024)
    for _ in range(5):
        spool.add(spool.reserve(), "disk0", line)
    assert list(spool.pending) == [2, 3, 4]
    assert spool.dropped == 2 and spool.bytes <= 1 * MiB
    assert spool.wait_synced()
    spool.close()
    assert list(Spool(tmp_path / "s", max_bytes=1 * MiB).pending) == [2, 3, 4]


def test_held_spool_does_not_touch_the_database(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 * MiB)
    spool.add(spool.reserve(), "disk0", b"a\n")
    assert spool.wait_synced()
    files = sorted((tmp_path / "s").iterdir())
    stamp = {f: (f.stat().st_mtime_ns, f.stat().st_size) for f in files}
    spool.hold()
    spool.add(spool.reserve(), "disk0", b"b\n")
    spool.remove(0)
    time.sleep(0.3)
    assert {f: (f.stat().st_mtime_ns, f.stat().st_size) for f in sorted((tmp_path / "s").iterdir())} == stamp
    assert list(spool.pending) == [1]  # the memory copy is current
    spool.release()
    assert spool.wait_synced()
    spool.close()
    assert list(Spool(tmp_path / "s", max_bytes=1 * MiB).pending) == [1]


def test_unusable_spool_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(AgentSetupError, match="file"):
        Spool(tmp_path / "file" / "spool", max_bytes=1 * MiB)


def test_spool_survives_kill_9_of_a_writer(tmp_path: Path) -> None:
    """A process adds records and is killed -9 at once: what it added is there."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from vmreclaim.agent.spool import Spool\n"
        "s = Spool(Path(sys.argv[1]), 1 << 20)\n"
        "for i in range(50):\n"
        "    s.add(s.reserve(), 'disk0', b'rec %d' % i)\n"
        "s.wait_synced()\n"
        "print('ok', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s")], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    spool = Spool(tmp_path / "s", max_bytes=1 * MiB)
    assert list(spool.pending) == list(range(50))
    spool.close()


@pytest.mark.root
def test_agent_killed_9_resends_unacked_records_after_restart(
    tmp_path: Path, loopfs: Callable[..., LoopFs], peer: HostPeer
) -> None:
    """Records the host never acknowledged survive kill -9 of the agent and are sent
    again, with the same seq, by the next agent; acknowledged ones are not."""
    fs = loopfs("ext4")
    config = agent_config(tmp_path, fs)
    agent = AgentProcess(tmp_path, config).start()
    try:
        conn = peer.accept(agent=agent)
        conn.handshake()
        initial = conn.expect(p.RecordMessage)
        conn.send(p.Ack(seq=initial.record["seq"]))  # the initial report: acked
        victim = write_file(fs.mount / "victim", 3 * MiB)
        want = fs.extents(victim)
        victim.unlink()
        record = conn.expect(p.RecordMessage, where=lambda m: m.record["bytes"] == want.total)
        agent.wait_log(f"record {record.record['seq']}")
        time.sleep(0.5)  # the spool's writer commits within milliseconds
        agent.kill9()
        conn.close()
    finally:
        agent.stop()
    agent = AgentProcess(tmp_path, {**config, "report_existing_free_space": False}).start()
    try:
        conn = peer.accept(agent=agent)
        conn.handshake()
        again = conn.expect(p.RecordMessage)
        assert again.record == record.record
        conn.send(p.Ack(seq=again.record["seq"]))
        agent.wait_log("spooled record(s)")
        assert "0 spooled record(s)" not in agent.log
        time.sleep(0.5)
    finally:
        agent.stop()
    # Everything acked: a third agent has nothing to resend.
    agent = AgentProcess(tmp_path, {**config, "report_existing_free_space": False}).start()
    try:
        conn = peer.accept(agent=agent)
        conn.handshake()
        agent.wait_log("0 spooled record(s)")
        conn.send(p.Ping(nonce=3))
        assert conn.expect(p.Pong).nonce == 3
        assert not conn.records
    finally:
        agent.stop()
