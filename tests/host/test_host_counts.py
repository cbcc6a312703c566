"""The host raises no fence for ranges that hold nothing, and counts only what it frees
(issue 21 item 2: an agent's "already free at start" report of mostly holes cost a guest
freeze at every boot and showed gigabytes "punched" for megabytes freed)."""

from __future__ import annotations

import asyncio

from hosttest import MiB, Site, allocated, eventually, running

from vmreclaim.core.protocol import Fence
from vmreclaim.testing.host import AgentPeer

FAST_FENCE = {"lease_seconds": 2.0, "margin_seconds": 0.5}


def grant_all(fence: Fence) -> tuple[list[tuple[int, int]], int]:
    return [(s, n) for s, n in fence.ranges], fence.lease_ms


def test_ranges_that_are_holes_raise_no_fence(site: Site) -> None:
    image = site.raw_disk("vm1.raw", data=[(0, 4 * MiB)])  # [4M, 8M) is a hole
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    config = site.config(fence=FAST_FENCE)

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(channel, on_fence=grant_all) as peer:
            seq = await peer.send_record([(4 * MiB, 4 * MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.totals.reclaims == 1)
            assert not peer.fences, "a fence was raised for ranges that hold nothing"
            assert rt.totals.punched_bytes == 0 and rt.totals.freed_bytes == 0
            assert not rt.pending  # handled: nothing left waiting

    asyncio.run(main())
    assert allocated(image) == 4 * MiB


def test_only_held_ranges_are_fenced_and_counted(site: Site) -> None:
    image = site.raw_disk("vm1.raw", data=[(0, 4 * MiB)])
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    config = site.config(fence=FAST_FENCE)

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(channel, on_fence=grant_all) as peer:
            seq = await peer.send_record([(2 * MiB, 6 * MiB)])  # half data, half hole
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.totals.reclaims == 1)
            (fence,) = peer.fences
            assert [tuple(r) for r in fence.ranges] == [(2 * MiB, 2 * MiB)]
            assert rt.totals.punched_bytes == rt.totals.freed_bytes == 2 * MiB

    asyncio.run(main())
    assert allocated(image) == 2 * MiB
