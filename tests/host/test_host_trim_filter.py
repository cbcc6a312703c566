"""Trim mode acts on the filtered plan: a ``vmreclaim_translate_filter`` veto holds when
the guest kernel frees the bytes, as it does for the host's own punch (issue 11 item 7)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from hosttest import MiB, Site, allocated, eventually, running

from vmreclaim import hookimpl
from vmreclaim.core.extents import ExtentKind
from vmreclaim.core.plugins import Plugins
from vmreclaim.core.protocol import HelloDisk, Trim
from vmreclaim.core.punch import punch_holes
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.core.reclaim import ReclaimPlan
from vmreclaim.testing.host import AgentPeer

FAST_FENCE = {"lease_seconds": 2.0, "margin_seconds": 0.5}


class KeepOnly:
    """Vetoes every host byte but those of guest range ``keep`` (``None``: every byte)."""

    def __init__(self, keep: ByteRange | None) -> None:
        self.keep = keep

    @hookimpl
    def vmreclaim_translate_filter(self, image: Any, plan: ReclaimPlan) -> RangeSet:
        if self.keep is None:
            return RangeSet()
        return image.map(self.keep).select(ExtentKind.DATA).host_ranges()


def _run(site: Site, keep: ByteRange | None) -> tuple[list[Trim], Any]:
    image = site.raw_disk("vm1.raw")
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw", "discard": True}])
    config = site.config(fence=FAST_FENCE)
    trims: list[Trim] = []

    def guest_discards(trim: Trim) -> int:
        # What the guest's FITRIM does through a discard=unmap disk: the image loses them.
        fd = os.open(image, os.O_RDWR)
        try:
            punch_holes(fd, RangeSet.from_ranges([(s, n) for s, n in trim.ranges]))
        finally:
            os.close(fd)
        return sum(n for _, n in trim.ranges)

    async def main() -> Any:
        disks = (HelloDisk(id="disk0", discard=True),)
        async with (
            running(config, plugins=Plugins([KeepOnly(keep)])) as daemon,
            AgentPeer(
                channel, disks=disks, capabilities=("records", "fence", "trim"), on_trim=guest_discards
            ) as peer,
        ):
            assert peer.welcome is not None and peer.welcome.disks[0].mode == "trim"
            seq = await peer.send_record([(0, 4 * MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.last_attempt is not None)
            trims.extend(peer.trims)
            return rt.last_attempt

    attempt = asyncio.run(main())
    return trims, (attempt, allocated(image))


def test_a_vetoing_plugin_holds_in_trim_mode(site: Site) -> None:
    """Asked for guest [0, 4M), a plugin keeps only [2M, 3M): only that is sent to trim."""
    trims, (attempt, alloc) = _run(site, ByteRange(2 * MiB, MiB))
    assert [list(t.ranges) for t in trims] == [[(2 * MiB, MiB)]]
    assert attempt.mode == "trim" and attempt.requested_bytes == 4 * MiB
    assert alloc == 7 * MiB


def test_a_plugin_that_vetoes_everything_sends_no_trim(site: Site) -> None:
    trims, (attempt, alloc) = _run(site, None)
    assert trims == []
    assert attempt.mode == "trim" and attempt.punched_bytes == 0
    assert alloc == 8 * MiB
