"""Hostile lines on a VM's channel (issue 11 items 3 and 9): every number is bounded by
what storage takes, any parse failure is an ``error`` reply counted as a bad line, records
are strict, and one bad record never fails another VM's records in the same commit."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hosttest import Site, eventually, running

from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.protocol import decode_from_agent, decode_from_host
from vmreclaim.testing.host import AgentPeer

HOLD = {"driver": "watermark", "batch_bytes": 2**60, "high_watermark": 1.0}
BIG = 2**63


def two_vms(site: Site) -> tuple[Path, Path]:
    a = site.add_vm("vm1", [{"id": "disk0", "path": site.raw_disk("vm1.raw"), "format": "raw"}])
    b = site.add_vm("vm2", [{"id": "disk0", "path": site.raw_disk("vm2.raw"), "format": "raw"}])
    return a, b


def rows(db: Path) -> list[tuple[str, int]]:
    con = sqlite3.connect(db)
    try:
        return [(d, s) for d, s in con.execute("SELECT disk, seq FROM records ORDER BY id")]
    finally:
        con.close()


HOSTILE_LINES = {
    "5000 digits": b'{"type": "pong", "nonce": ' + b"9" * 5000 + b"}\n",
    "nested 100000": b'{"type": "pong", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
    "invalid utf-8": b'{"type": "error", "error": "\xff\xfe\xfd"}\n',
    "NaN": b'{"type": "pong", "nonce": NaN}\n',
    "Infinity": b'{"type": "trim_done", "fence": 1, "trimmed_bytes": Infinity}\n',
    "trimmed 2^64": b'{"type": "trim_done", "fence": 1, "trimmed_bytes": 18446744073709551616}\n',
    "fence 2^63": b'{"type": "fence_refused", "fence": 9223372036854775808, "error": "x"}\n',
    "nonce 2^63": b'{"type": "pong", "nonce": 9223372036854775808}\n',
    "record nested": (b'{"type": "record", "record": {"x": ' + b"{" * 50_000 + b"}" * 50_000 + b"}}\n"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_LINES))
def test_every_parse_failure_is_a_protocol_error(name: str) -> None:
    with pytest.raises(ProtocolError):
        decode_from_agent(HOSTILE_LINES[name])
    with pytest.raises(ProtocolError):
        decode_from_host(HOSTILE_LINES[name])


def test_hostile_lines_get_error_replies_and_count_as_bad_lines(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    ch1, _ = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(ch1) as peer:
            for line in HOSTILE_LINES.values():
                await peer.send_raw(line)
            # The session survived every line and still takes an honest record.
            seq = await peer.send_record([(0, 4096)])
            await peer.wait_answered(seq)
            assert seq in peer.acked
            await eventually(lambda: len(peer.errors) >= len(HOSTILE_LINES), what="error replies")
            assert daemon.vms["vm1"].rejected == len(HOSTILE_LINES)
            assert not peer.closed.is_set()

    with caplog.at_level(logging.WARNING, logger="vmreclaim.host"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.exc_info], "a hostile line raised a traceback"


BAD_RECORDS: dict[str, dict[str, Any]] = {
    "seq 2^63": {"seq": BIG},
    "seq 2^64": {"seq": 2**64},
    "bytes 2^63": {"bytes": BIG},
    "v true": {"v": True},
    "v 1.0": {"v": 1.0},
    "unknown key": {"colour": "red"},
    "seq true": {"seq": True},
    "fs number": {"fs": 7},
}


def test_out_of_range_and_loose_records_are_nacked_and_never_stored(site: Site) -> None:
    ch1, _ = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config), AgentPeer(ch1) as peer:
            for i, fields in enumerate(BAD_RECORDS.values()):
                doc = {
                    "v": 1,
                    "vm": "",
                    "disk": "disk0",
                    "ranges": [[i * 4096, 4096]],
                    "bytes": 4096,
                    "fs": "ext4",
                    "seq": 100 + i,
                    **fields,
                }
                await peer.send_raw(json.dumps({"type": "record", "record": doc}).encode() + b"\n")
            good = await peer.send_record([(1 << 20, 4096)])
            await peer.wait_answered(good)
            assert good in peer.acked
            # Every bad record got an answer that is not an ack (a nack, or an error when
            # its seq could not even be echoed), and none is stored.
            await eventually(lambda: len(peer.nacked) + len(peer.errors) >= len(BAD_RECORDS), what="refusals")
            assert not (peer.acked - {good})
            assert rows(config.database) == [("vm1/disk0", good)]

    asyncio.run(main())


def test_one_failing_record_does_not_fail_another_vms_records_in_the_same_commit(site: Site) -> None:
    """A record the database itself refuses (here a real SQLite trigger, the way a
    value the validation missed would fail) costs only that record."""
    ch1, ch2 = two_vms(site)
    config = site.config(policy=HOLD)
    con = sqlite3.connect(config.database)
    con.executescript(
        """
        CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, disk TEXT NOT NULL,
            seq INTEGER NOT NULL, received REAL NOT NULL, bytes INTEGER NOT NULL,
            count INTEGER NOT NULL, ranges BLOB NOT NULL);
        CREATE TRIGGER refuse_666 BEFORE INSERT ON records WHEN NEW.seq = 666
        BEGIN SELECT RAISE(ABORT, 'record 666 refused by the test trigger'); END;
        """
    )
    con.close()

    async def main() -> None:
        async with running(config), AgentPeer(ch1) as bad, AgentPeer(ch2) as good:
            for round_ in range(5):
                # Both in the same group commit: sent back to back on both channels.
                sent = []
                await bad.send_record([(round_ * 4096, 4096)], seq=666)
                for i in range(10):
                    sent.append(await good.send_record([((round_ * 10 + i) * 4096, 4096)]))
                await good.wait_answered(sent)
                assert set(sent) <= good.acked, f"round {round_}: vm2 lost acks"
                assert not good.errors
            assert 666 not in bad.acked
            stored = rows(config.database)
            assert len([r for r in stored if r[0] == "vm2/disk0"]) == 50
            assert not [r for r in stored if r[1] == 666]

    asyncio.run(main())
