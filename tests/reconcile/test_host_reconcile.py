"""The daemon's side of reconciliation with a scripted agent (``AgentPeer``) over real
sockets, a real raw image and SQLite: when it asks, what it stores, what it refuses."""

from __future__ import annotations

import asyncio
import base64
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from hosttest import MiB, Site, eventually, running

from vmreclaim.core import freespace
from vmreclaim.core.freespace import FreeSpace, Reconcile
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing.host import AgentPeer

HOLD = {"driver": "watermark", "batch_bytes": 2**60, "high_watermark": 1.0}
DISK = 8 * MiB


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def one_vm(site: Site) -> tuple[Path, Path]:
    image = site.raw_disk("vm1.raw", DISK, [(0, 4 * MiB)])
    return site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}]), image


def answering(free: RangeSet) -> object:
    def answer(request: Reconcile) -> Sequence[FreeSpace]:
        return freespace.messages(request, freespace.encode(free))

    return answer


def test_connect_asks_and_stores_free_intersect_data(site: Site) -> None:
    ch, _image = one_vm(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config) as daemon:
            peer = AgentPeer(ch, on_reconcile=answering(RangeSet([1 * MiB], [6 * MiB])))  # type: ignore[arg-type]
            await peer.connect()
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.pending.exact(), what="reconciled ranges pending")
            # Free [1, 6) MiB ∩ data [0, 4) MiB: the holes of the raw file are not garbage.
            assert rt.pending.exact() == RangeSet([1 * MiB], [4 * MiB])
            assert peer.reconciles[0].disk == "disk0"
            assert daemon.reconciliations is not None
            state = daemon.reconciliations.states["vm1/disk0"]
            assert state.reclaimable_bytes == 3 * MiB and state.last_at is not None
            await peer.close()

    asyncio.run(main())


def chunk(values: list[int]) -> str:
    raw = bytearray()
    for v in values:
        while True:
            raw.append((v & 0x7F) | (0x80 if v >> 7 else 0))
            v >>= 7
            if not v:
                break
    return base64.b64encode(zlib.compress(bytes(raw))).decode()


@pytest.mark.parametrize(
    "bad, why",
    [
        # A range past the end of the 8 MiB disk (in 4 KiB units: block 2047 + 2 blocks).
        (lambda r: FreeSpace(id=r.id, disk=r.disk, chunk=0, chunks=1, unit=4096, ranges=1, bytes=8192,
                             data=chunk([2047, 2])), "past the disk end"),
        (lambda r: FreeSpace(id=r.id, disk="disk9", chunk=0, chunks=1, unit=4096, ranges=1, bytes=4096,
                             data=chunk([1, 1])), "names disk"),
        (lambda r: FreeSpace(id=r.id + 99, disk=r.disk, chunk=0, chunks=0), "did not ask"),
        (lambda r: FreeSpace(id=r.id, disk=r.disk, chunk=0, chunks=1, unit=4096, ranges=1, bytes=4096,
                             data=base64.b64encode(zlib.compress(b"\x01" * 3_000_000)).decode()), "inflates"),
    ],
)  # fmt: skip
def test_hostile_answers_store_nothing(site: Site, bad: object, why: str) -> None:
    ch, _image = one_vm(site)
    config = site.config(policy=HOLD)

    async def main() -> None:
        async with running(config) as daemon:
            peer = AgentPeer(ch, on_reconcile=lambda r: [bad(r)])  # type: ignore[operator]
            await peer.connect()
            await eventually(lambda: daemon.vms["vm1"].rejected >= 1, what="the answer refused")
            await eventually(lambda: any(why in e for e in peer.errors), what="the error sent back")
            rt = daemon.disks["vm1/disk0"]
            await asyncio.sleep(0.5)
            assert not rt.pending.exact(), "nothing of a refused answer is stored"
            await peer.close()

    asyncio.run(main())


def test_version_1_agent_is_never_asked(site: Site) -> None:
    ch, _image = one_vm(site)
    config = site.config(policy=HOLD, reconcile={"interval_seconds": 0.5, "min_gap_seconds": 0})

    async def main() -> None:
        async with running(config):
            peer = AgentPeer(ch, version=1)
            welcome = await peer.connect()
            assert welcome is not None and welcome.v == 1
            await asyncio.sleep(2)
            assert peer.reconciles == [] and peer.errors == []
            await peer.close()

    asyncio.run(main())


def test_growth_and_timer_ask_again(site: Site) -> None:
    ch, image = one_vm(site)
    config = site.config(
        policy=HOLD, reconcile={"growth_bytes": 1 * MiB, "min_gap_seconds": 0.5, "interval_seconds": 3600}
    )

    async def main() -> None:
        async with running(config):
            peer = AgentPeer(ch, on_reconcile=answering(RangeSet()))  # type: ignore[arg-type]
            await peer.connect()
            await eventually(lambda: len(peer.reconciles) == 1, what="the reconciliation at connect")
            await asyncio.sleep(1.5)
            assert len(peer.reconciles) == 1, "nothing grew, the hour has not passed: no second ask"
            # The image grows by 2 MiB (the guest wrote into a hole): ask again.
            with open(image, "r+b") as f:
                f.seek(5 * MiB)
                f.write(b"g" * 2 * MiB)
                os.fsync(f.fileno())
            await eventually(lambda: len(peer.reconciles) == 2, what="the reconciliation on growth")
            await peer.close()

    asyncio.run(main())

    config = site.config(policy=HOLD, reconcile={"interval_seconds": 0.5, "min_gap_seconds": 0})

    async def timer() -> None:
        async with running(config):
            peer = AgentPeer(ch, on_reconcile=answering(RangeSet()))  # type: ignore[arg-type]
            await peer.connect()
            await eventually(lambda: len(peer.reconciles) >= 3, what="reconciliations on the timer")
            await peer.close()

    asyncio.run(timer())
