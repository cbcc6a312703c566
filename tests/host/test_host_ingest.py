"""Receiving records: identity from the channel, durable before ack, bad input refused
and counted while every other VM goes on being served."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from hosttest import MiB, Site, eventually, running

from vmreclaim.core.model import MAX_RANGES_PER_RECORD
from vmreclaim.core.protocol import HelloDisk, RecordMessage
from vmreclaim.core.transports import MAX_LINE_BYTES
from vmreclaim.testing.host import AgentPeer

# A policy that never reclaims, so records stay where a test can see them.
HOLD = {"driver": "watermark", "batch_bytes": 2**60, "high_watermark": 1.0}


def stored(db: Path) -> list[tuple[str, int, list[list[int]]]]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT disk, seq, ranges FROM records ORDER BY id").fetchall()
    finally:
        con.close()
    out = []
    for disk, seq, blob in rows:
        import numpy as np

        pairs = np.frombuffer(blob, "<i8").reshape(-1, 2)
        out.append((disk, seq, [[int(s), int(e - s)] for s, e in pairs]))
    return out


def two_vms(site: Site) -> tuple[Path, Path]:
    a = site.add_vm("vm1", [{"id": "disk0", "path": site.raw_disk("vm1.raw"), "format": "raw"}])
    b = site.add_vm(
        "vm2",
        [
            {"id": "disk0", "path": site.raw_disk("vm2.raw"), "format": "raw"},
            {"id": "data", "path": site.raw_disk("vm2-data.raw"), "format": "raw"},
        ],
    )
    return a, b


def test_ack_comes_only_after_the_record_is_in_the_database(site: Site) -> None:
    ch, _ = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config), AgentPeer(ch) as peer:
            for i in range(20):
                seq = await peer.send_record([(i * 8192, 4096)])
                await peer.wait_answered(seq)
                assert seq in peer.acked
                # Another reader sees it the moment the ack arrives: it was committed.
                assert ("vm1/disk0", seq, [[i * 8192, 4096]]) in stored(config.database)

    asyncio.run(main())


def test_identity_comes_from_the_channel_not_the_record(site: Site) -> None:
    ch1, _ch2 = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(ch1) as peer:
            assert peer.welcome is not None and peer.welcome.vm == "vm1"
            # It claims to be vm2 and names vm2's second disk: the VM is ignored, the disk
            # does not exist on vm1, so the record is refused.
            s1 = await peer.send_record([(0, 4096)], vm="vm2")
            s2 = await peer.send_record([(0, 4096)], disk="data", vm="vm2")
            await peer.wait_answered([s1, s2])
            assert s1 in peer.acked
            assert "VM vm1 has no disk 'data'" in peer.nacked[s2]
            assert [d for d, _, _ in stored(config.database)] == ["vm1/disk0"]
            assert daemon.disks["vm2/data"].pending.records == 0

    asyncio.run(main())


def test_bad_records_are_refused_counted_and_others_keep_being_served(site: Site) -> None:
    ch1, ch2 = two_vms(site)
    config = site.config(policy=HOLD)
    size = 8 * MiB

    async def main() -> None:
        async with running(config) as daemon:
            bad = AgentPeer(ch1)
            good = AgentPeer(ch2, disks=(HelloDisk(id="disk0"), HelloDisk(id="data")))
            await bad.connect()
            await good.connect()
            nacks = {
                await bad.send_record([(size - 4096, 8192)]): "outside disk 'disk0'",
                await bad.send_record([(0, 4096)], disk="nope"): "has no disk 'nope'",
                await bad.send_record(
                    [[i * 2, 1] for i in range(MAX_RANGES_PER_RECORD + 1)]
                ): "more than the limit",
                await bad.send_record([(0, 0)]): "is empty",
                await bad.send_record([(-4096, 4096)]): "negative",
                await bad.send_record([(0, 4096)], bytes=10**9): "is not the 4096 bytes",
                await bad.send_record([(0, 4096)], bytes=None, fs=[1]): "'fs' must be a string",
                await bad.send_record([(0, 4096)], v=7): "version 7",
            }
            await bad.send(RecordMessage(record={"disk": "disk0", "ranges": [[0.5, 4096]], "seq": 99}))
            nacks[99] = "two integers"
            await bad.send_raw(b"{this is not json\n")
            await bad.send_raw(b'{"type": "record"}\n')
            await bad.send_raw(b'{"type": "launch_missiles"}\n')
            await bad.send_raw(b"[1, 2, 3]\n")
            # Meanwhile the other VM's records flow.
            good_seqs = [await good.send_record([(i * 4096, 4096)], disk="data") for i in range(50)]
            await bad.wait_answered(list(nacks))
            await good.wait_answered(good_seqs)
            for seq, words in nacks.items():
                assert words in bad.nacked[seq], (seq, bad.nacked[seq])
            assert set(good_seqs) <= good.acked
            await eventually(lambda: len(bad.errors) >= 4, what="error answers")
            assert daemon.rejected_total == len(nacks) + 4
            assert daemon.vms["vm1"].rejected == len(nacks) + 4
            assert daemon.vms["vm2"].rejected == 0
            assert not bad.closed.is_set()  # bad lines do not cost the channel
            # A good record on the bad channel still goes through.
            seq = await bad.send_record([(0, 4096)])
            await bad.wait_answered(seq)
            assert seq in bad.acked
            doc = await daemon.status_document()
            assert doc["rejected_records"] == len(nacks) + 4
            await bad.close()
            await good.close()
        # The count survives a restart.
        async with running(config) as daemon:
            assert (await daemon.status_document())["rejected_records"] == len(nacks) + 4

    asyncio.run(main())


def test_an_oversize_line_is_skipped_and_the_channel_goes_on(site: Site) -> None:
    ch, _ = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(ch) as peer:
            junk = (
                b'{"type": "record", "record": {"ranges": [' + b"[0, 1]," * (MAX_LINE_BYTES // 7) + b"]}}\n"
            )
            assert len(junk) > MAX_LINE_BYTES
            await peer.send_raw(junk)
            seq = await peer.send_record([(0, 4096)])
            await peer.wait_answered(seq)
            assert seq in peer.acked
            assert any("exceeds the limit" in e for e in peer.errors)
            assert daemon.vms["vm1"].rejected == 1

    asyncio.run(main())


def test_a_flood_of_garbage_drops_the_channel_only(site: Site) -> None:
    ch1, ch2 = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config), AgentPeer(ch1) as bad, AgentPeer(ch2) as good:
            for _ in range(40):
                await bad.send_raw(b"garbage\n")
            await asyncio.wait_for(bad.closed.wait(), 10)
            seq = await good.send_record([(0, 4096)])
            await good.wait_answered(seq)
            assert seq in good.acked
            # The bad VM may reconnect and be served again.
            again = AgentPeer(ch1)
            await again.connect()
            seq = await again.send_record([(0, 4096)])
            await again.wait_answered(seq)
            assert seq in again.acked
            await again.close()

    asyncio.run(main())


def test_handshake_refusals(site: Site) -> None:
    ch, _ = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config) as daemon:
            old = AgentPeer(ch, version=0)
            assert await old.connect() is None
            assert "protocol version 0 is not supported" in old.errors[0]
            await old.close()
            rude = AgentPeer(ch)
            await rude.connect(hello=False)
            await rude.send_record([(0, 4096)])
            await asyncio.wait_for(rude.closed.wait(), 10)
            assert "first message must be 'hello'" in rude.errors[0]
            await rude.close()
            # A newer agent is answered in the version this host speaks.
            newer = AgentPeer(ch, version=9)
            welcome = await newer.connect()
            assert welcome is not None and welcome.v == 2
            await newer.close()
            # A version 1 agent is answered in version 1 (no reconciliation asked of it).
            older = AgentPeer(ch, version=1)
            welcome = await older.connect()
            assert welcome is not None and welcome.v == 1
            await older.close()
            assert daemon.vms["vm1"].rejected == 2

    asyncio.run(main())


def test_a_disk_whose_size_disagrees_is_not_this_disk(site: Site) -> None:
    ch, _ = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config), AgentPeer(ch, disks=(HelloDisk(id="disk0", size=16 * MiB),)) as peer:
            seq = await peer.send_record([(0, 4096)])
            await peer.wait_answered(seq)
            assert "virtual size of 8388608 bytes" in peer.nacked[seq]
            assert stored(config.database) == []

    asyncio.run(main())


def test_replayed_records_are_harmless(site: Site) -> None:
    ch, _ = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(ch) as peer:
            for _ in range(3):
                await peer.send_record([(0, 4096), (65536, 4096)], seq=1)
            await peer.wait_until(lambda: 1 in peer.acked)
            # A replay is merged into the record it repeats, never stored again.
            await asyncio.sleep(0.3)
            assert daemon.disks["vm1/disk0"].pending.records == 1
            assert daemon.disks["vm1/disk0"].pending.exact().total == 8192

    asyncio.run(main())


def test_a_newer_connection_replaces_the_old_one(site: Site) -> None:
    ch, _ = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config) as daemon:
            first = AgentPeer(ch)
            await first.connect()
            second = AgentPeer(ch)
            await second.connect()
            await asyncio.wait_for(first.closed.wait(), 10)
            assert daemon.vms["vm1"].session is not None
            assert daemon.vms["vm1"].session.info.agent == "vmreclaim.testing AgentPeer"
            seq = await second.send_record([(0, 4096)])
            await second.wait_answered(seq)
            assert seq in second.acked
            await second.close()

    asyncio.run(main())


def test_status_shows_pending_per_disk(site: Site) -> None:
    ch, _ = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(ch) as peer:
            seqs = [await peer.send_record([(0, 8192)]), await peer.send_record([(4096, 8192)])]
            await peer.wait_answered(seqs)
            await eventually(lambda: daemon.disks["vm1/disk0"].pending.records == 2)
            doc = json.loads(json.dumps(await daemon.status_document()))
            (vm1,) = [v for v in doc["vms"] if v["name"] == "vm1"]
            disk = vm1["disks"][0]
            assert disk["pending_bytes"] == 12288 and disk["pending_ranges"] == 1
            assert disk["received_records"] == 2 and disk["punched_bytes"] == 0
            assert vm1["agent"]["connected"] is True
            assert doc["policy"]["driver"] == "watermark"

    asyncio.run(main())


def test_a_disk_with_a_full_backlog_refuses_more(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmreclaim.host import budget

    monkeypatch.setattr(budget, "DEFAULT_LIMITS", budget.Limits(ranges_per_disk=10))
    ch, _ = two_vms(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(ch) as peer:
            first = await peer.send_record([(i * 8192, 4096) for i in range(8)])
            await peer.wait_answered(first)
            await eventually(lambda: daemon.disks["vm1/disk0"].pending.records == 1)
            second = await peer.send_record([((1 << 20) + i * 8192, 4096) for i in range(8)])
            await peer.wait_answered(second)
            assert first in peer.acked
            assert "pending ranges (limit 10); refused" in peer.nacked[second]

    asyncio.run(main())
