"""Live reclaim under a fence: only re-verified ranges, only inside the lease, always
released; refused, late, dropped and block-job cases punch nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from hosttest import MiB, Site, allocated, eventually, running

from vmreclaim import hookimpl
from vmreclaim.core.hypervisors import HypervisorCapabilities, VMInfo
from vmreclaim.core.lease import Lease
from vmreclaim.core.model import Disk, VMIdentity
from vmreclaim.core.plugins import Plugins
from vmreclaim.core.protocol import Fence, HelloDisk, Released, Trim
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.reclaim import ReclaimPlan
from vmreclaim.plugins.hypervisors.static import StaticHypervisor
from vmreclaim.testing import qemu_io_holding, require_tool
from vmreclaim.testing.host import AgentPeer

FAST_FENCE = {"lease_seconds": 2.0, "margin_seconds": 0.5}


def read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def one_vm(site: Site, **disk: Any) -> tuple[Path, Path]:
    image = site.raw_disk("vm1.raw")
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw", **disk}])
    return image, channel


class PunchClock:
    """A hook plugin that notes when the punch is about to run (the translate filter, the
    last hook before it) and when it has run (``reclaim_done``), what lease the filter
    was given, and may stall translation."""

    def __init__(self, stall: float = 0.0) -> None:
        self.stall = stall
        self.filtered: list[float] = []
        self.done: list[float] = []
        self.leases: list[Lease | None] = []

    @hookimpl
    def vmreclaim_translate_filter(self, plan: ReclaimPlan, lease: Lease | None) -> RangeSet | None:
        self.leases.append(lease)
        time.sleep(self.stall)
        self.filtered.append(time.monotonic())
        return None

    @hookimpl
    def vmreclaim_reclaim_done(self) -> None:
        self.done.append(time.monotonic())


class JobsHypervisor(StaticHypervisor):
    """The static driver, plus what a libvirt or QMP driver would say: the VM runs, and
    these block jobs run on its disks (a test double of a block-job-aware hypervisor)."""

    capabilities: ClassVar[HypervisorCapabilities] = HypervisorCapabilities(block_jobs=True)
    jobs: ClassVar[list[str]] = []

    def refresh(self, vm: VMIdentity) -> VMInfo | None:
        info = super().refresh(vm)
        return dataclasses.replace(info, running=True) if info is not None else None

    def block_jobs(self, vm: VMIdentity, disk: Disk) -> list[str]:
        return list(self.jobs)


def test_only_the_reverified_ranges_are_punched_inside_the_fence(site: Site) -> None:
    image, channel = one_vm(site)
    original = image.read_bytes()
    clock = PunchClock()
    config = site.config(fence=FAST_FENCE)

    def grant(fence: Fence) -> tuple[list[tuple[int, int]], int]:
        # Only [2M, 3M) is still free; [6M, 7M) was never asked and must be ignored.
        return [(2 * MiB, MiB), (6 * MiB, MiB)], fence.lease_ms

    async def main() -> None:
        async with (
            running(config, plugins=Plugins([clock])) as daemon,
            AgentPeer(channel, on_fence=grant) as peer,
        ):
            seq = await peer.send_record([(0, MiB), (2 * MiB, MiB), (4 * MiB, MiB)])
            await peer.wait_answered(seq)
            await peer.wait_until(lambda: len(peer.releases) == 1)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.totals.reclaims == 1)
            assert rt.totals.requested_bytes == 3 * MiB
            assert rt.totals.verified_bytes == MiB
            assert rt.totals.punched_bytes == MiB and rt.totals.freed_bytes == MiB
            assert not rt.pending  # ranges no longer free are no longer garbage
            (fence,) = peer.fences
            ready_at, _ = peer.ready[fence.fence]
            released_at, release = peer.releases[0]
            assert release.fence == fence.fence
            (punched_at,) = clock.filtered
            (done_at,) = clock.done
            assert ready_at <= punched_at <= done_at <= released_at
            (lease,) = clock.leases
            assert lease is not None  # the fence's lease, handed to the filter

    asyncio.run(main())
    assert allocated(image) == 7 * MiB
    after = image.read_bytes()
    assert after[2 * MiB : 3 * MiB] == bytes(MiB)
    assert after[: 2 * MiB] == original[: 2 * MiB]
    assert after[3 * MiB :] == original[3 * MiB :]


def test_a_late_fence_ready_is_released_at_once_and_nothing_is_punched(site: Site) -> None:
    image, channel = one_vm(site)
    config = site.config(fence={"lease_seconds": 1.0, "margin_seconds": 0.5})
    slow = {"delay": 0.9}

    async def answer(fence: Fence) -> tuple[list[tuple[int, int]], int]:
        await asyncio.sleep(slow["delay"])
        return [(s, n) for s, n in fence.ranges], fence.lease_ms

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(channel, on_fence=answer) as peer:
            seq = await peer.send_record([(0, MiB)])
            await peer.wait_answered(seq)
            await peer.wait_until(lambda: len(peer.releases) >= 1, timeout=10)
            first = peer.fences[0].fence
            assert peer.releases[0][1].fence == first
            rt = daemon.disks["vm1/disk0"]
            assert rt.totals.punched_bytes == 0 and allocated(image) == 8 * MiB
            assert rt.pending.records == 1
            assert rt.last_attempt is not None and rt.last_attempt.outcome == "refused"
            assert "did not answer fence" in rt.last_attempt.detail
            # A prompt agent gets it done on the retry.
            slow["delay"] = 0.0
            await eventually(lambda: rt.totals.punched_bytes == MiB, timeout=15)

    asyncio.run(main())
    assert allocated(image) == 7 * MiB


def test_a_lease_shorter_than_the_margin_punches_nothing(site: Site) -> None:
    image, channel = one_vm(site)
    config = site.config(fence=FAST_FENCE)

    def tiny(fence: Fence) -> tuple[list[tuple[int, int]], int]:
        return [(s, n) for s, n in fence.ranges], 100  # 0.1 s < the 0.5 s margin

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(channel, on_fence=tiny) as peer:
            seq = await peer.send_record([(0, MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.last_attempt is not None)
            assert rt.last_attempt is not None and rt.last_attempt.outcome == "expired"
            await peer.wait_until(lambda: len(peer.releases) >= 1)
            assert rt.pending.records == 1

    asyncio.run(main())
    assert allocated(image) == 8 * MiB


def test_translation_that_outlasts_the_lease_punches_nothing(site: Site) -> None:
    image, channel = one_vm(site)
    clock = PunchClock(stall=1.2)
    config = site.config(
        fence={"lease_seconds": 1.0, "margin_seconds": 0.2}, reclaim={"retry_max_seconds": 60}
    )

    async def main() -> None:
        async with running(config, plugins=Plugins([clock])) as daemon, AgentPeer(channel) as peer:
            seq = await peer.send_record([(0, MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.last_attempt is not None, timeout=10)
            assert rt.last_attempt is not None and rt.last_attempt.outcome == "expired"
            assert "lease ended" in rt.last_attempt.detail
            assert clock.done == []  # reclaim_done follows a punch; none ran

    asyncio.run(main())
    assert allocated(image) == 8 * MiB


def test_the_agent_thawing_early_revokes_the_lease(site: Site) -> None:
    image, channel = one_vm(site)
    clock = PunchClock(stall=0.5)
    config = site.config(
        fence={"lease_seconds": 5.0, "margin_seconds": 0.5}, reclaim={"retry_max_seconds": 60}
    )
    peer_box: dict[str, AgentPeer] = {}

    async def ready_then_thaw(fence: Fence) -> tuple[list[tuple[int, int]], int]:
        async def thaw() -> None:
            await asyncio.sleep(0.1)
            await peer_box["p"].send(Released(fence=fence.fence, why="lease"))

        asyncio.get_running_loop().create_task(thaw())
        return [(s, n) for s, n in fence.ranges], fence.lease_ms

    async def main() -> None:
        async with running(config, plugins=Plugins([clock])) as daemon:
            peer = peer_box["p"] = AgentPeer(channel, on_fence=ready_then_thaw)
            await peer.connect()
            seq = await peer.send_record([(0, MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.last_attempt is not None, timeout=10)
            assert rt.last_attempt is not None and rt.last_attempt.outcome == "expired"
            assert "released fence" in rt.last_attempt.detail
            await peer.close()

    asyncio.run(main())
    assert allocated(image) == 8 * MiB


def test_refused_fences_keep_the_records_until_one_is_granted(site: Site) -> None:
    image, channel = one_vm(site)
    config = site.config(fence=FAST_FENCE)
    answers = iter(["FIFREEZE: EBUSY", "FIFREEZE: EBUSY"])

    def sometimes(fence: Fence) -> Any:
        return next(answers, None) or ([(s, n) for s, n in fence.ranges], fence.lease_ms)

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(channel, on_fence=sometimes) as peer:
            seq = await peer.send_record([(MiB, MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.totals.punched_bytes == MiB, timeout=20)
            assert len(peer.fences) == 3
            assert len(peer.releases) == 1  # only the granted fence is released
            rows = daemon.store.recent_reclaims("vm1/disk0") if daemon.store else []
            assert [r.outcome for r in reversed(rows)] == ["refused", "refused", "done"]
            assert "EBUSY" in rows[-1].detail

    asyncio.run(main())
    assert allocated(image) == 7 * MiB


def test_a_channel_that_drops_mid_fence_punches_nothing(site: Site) -> None:
    image, channel = one_vm(site)
    config = site.config(fence=FAST_FENCE, reclaim={"retry_max_seconds": 60})
    box: dict[str, AgentPeer] = {}

    async def vanish(fence: Fence) -> str:
        assert box["p"]._writer is not None
        box["p"]._writer.transport.abort()
        return "gone"

    async def main() -> None:
        async with running(config) as daemon:
            peer = box["p"] = AgentPeer(channel, on_fence=vanish)
            await peer.connect()
            seq = await peer.send_record([(0, MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.last_attempt is not None, timeout=10)
            assert rt.last_attempt is not None and rt.last_attempt.outcome in ("refused", "postponed")
            assert rt.pending.records == 1
            await peer.close()

    asyncio.run(main())
    assert allocated(image) == 8 * MiB


def test_block_jobs_stop_a_live_punch_before_and_inside_the_fence(site: Site) -> None:
    image, channel = one_vm(site)
    config = site.config(fence=FAST_FENCE, reclaim={"tick_seconds": 0.1, "retry_max_seconds": 0.2})
    hv = JobsHypervisor(config.hypervisor.options)
    hv.jobs = ["mirror"]

    def job_starts_under_fence(fence: Fence) -> tuple[list[tuple[int, int]], int]:
        hv.jobs = ["backup"]  # the hypervisor starts a backup while the guest is frozen
        return [(s, n) for s, n in fence.ranges], fence.lease_ms

    async def main() -> None:
        async with running(config, hypervisor=hv) as daemon:
            peer = AgentPeer(channel, on_fence=job_starts_under_fence)
            await peer.connect()
            seq = await peer.send_record([(0, MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.last_attempt is not None)
            assert rt.last_attempt is not None and "block job mirror" in rt.last_attempt.detail
            assert peer.fences == []  # not even fenced while the mirror runs
            hv.jobs = []
            await eventually(lambda: len(peer.releases) >= 1)
            await eventually(lambda: rt.last_attempt is not None and "backup" in rt.last_attempt.detail)
            assert rt.totals.punched_bytes == 0 and rt.pending.records == 1
            peer.on_fence = lambda f: ([(s, n) for s, n in f.ranges], f.lease_ms)
            hv.jobs = []
            await eventually(lambda: rt.totals.punched_bytes == MiB)
            await peer.close()

    asyncio.run(main())
    assert allocated(image) == 7 * MiB


def test_a_running_vm_is_not_punched_when_block_jobs_cannot_be_known(site: Site) -> None:
    require_tool("qemu-io")
    image, channel = one_vm(site)
    config = site.config(fence=FAST_FENCE, reclaim={"retry_max_seconds": 60})

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(channel) as peer:
            seq = await peer.send_record([(0, MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.last_attempt is not None and not rt.busy)
            assert rt.last_attempt is not None
            assert "cannot report block jobs" in rt.last_attempt.detail
            assert peer.fences == []
            doc = await daemon.status_document()
            assert doc["vms"][0]["running"] is True
            assert "cannot report block jobs" in doc["vms"][0]["disks"][0]["state"]

    with qemu_io_holding(image):
        asyncio.run(main())
    assert allocated(image) == 8 * MiB


def test_a_running_static_vm_declared_free_of_block_jobs_is_fenced_and_punched(site: Site) -> None:
    """`block_jobs: none` is the operator's statement that nothing runs block jobs on the
    VM's disks (a qemu-storage-daemon they control): the static driver then lets a VM
    that a QEMU process holds be punched inside a fence."""
    require_tool("qemu-io")
    image, channel = one_vm(site)
    site.vms[0]["block_jobs"] = "none"
    config = site.config(fence=FAST_FENCE)

    def grant(fence: Fence) -> tuple[list[tuple[int, int]], int]:
        return [(s, n) for s, n in fence.ranges], fence.lease_ms

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(channel, on_fence=grant) as peer:
            seq = await peer.send_record([(0, MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.totals.reclaims == 1)
            assert len(peer.fences) == 1 and rt.totals.freed_bytes == MiB
            doc = await daemon.status_document()
            assert doc["vms"][0]["running"] is True

    with qemu_io_holding(image):
        asyncio.run(main())
    assert allocated(image) == 7 * MiB


def test_guest_trim_mode_when_the_disk_passes_discards(site: Site) -> None:
    image, channel = one_vm(site, discard=True)
    config = site.config(fence=FAST_FENCE)

    def guest_discards(trim: Trim) -> int:
        # What the guest's FITRIM does through a discard=unmap disk: the image loses them.
        fd = os.open(image, os.O_RDWR)
        try:
            from vmreclaim.core.punch import punch_holes

            punch_holes(fd, RangeSet.from_ranges([(s, n) for s, n in trim.ranges]))
        finally:
            os.close(fd)
        return sum(n for _, n in trim.ranges)

    async def main() -> None:
        disks = (HelloDisk(id="disk0", discard=True),)
        async with running(config) as daemon:
            async with AgentPeer(
                channel, disks=disks, capabilities=("records", "fence", "trim"), on_trim=guest_discards
            ) as peer:
                assert peer.welcome is not None and peer.welcome.disks[0].mode == "trim"
                seq = await peer.send_record([(0, MiB), (3 * MiB, MiB)])
                await peer.wait_answered(seq)
                rt = daemon.disks["vm1/disk0"]
                await eventually(lambda: rt.totals.reclaims == 1)
                assert peer.fences == [] and len(peer.trims) == 1
                assert rt.totals.freed_bytes == 2 * MiB and rt.totals.punched_bytes == 2 * MiB
                assert rt.last_attempt is not None and rt.last_attempt.mode == "trim"
            # Without the trim capability the same disk is fenced.
            async with AgentPeer(channel, disks=disks) as peer:
                assert peer.welcome is not None and peer.welcome.disks[0].mode == "fence"

    asyncio.run(main())
    assert allocated(image) == 6 * MiB


def test_a_backlog_larger_than_one_fence_goes_in_several(site: Site) -> None:
    n = 70_000
    starts = np.arange(n, dtype=np.int64) * 8192
    # Data in every asked range: ranges that hold nothing raise no fence at all.
    image = site.raw_disk("big.raw", size=n * 8192, data=[(int(s), 4096) for s in starts])
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    # 65,536 punches in one fence: a lease with room for a loaded machine.
    config = site.config(fence={"lease_seconds": 30.0, "margin_seconds": 1.0})

    async def main() -> None:
        async with running(config) as daemon, AgentPeer(channel) as peer:
            a = await peer.send_record([(int(s), 4096) for s in starts[:40_000]])
            b = await peer.send_record([(int(s), 4096) for s in starts[40_000:]])
            await peer.wait_answered([a, b])
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: not rt.pending and rt.totals.reclaims >= 2, timeout=60)
            sizes = sorted(len(f.ranges) for f in peer.fences)
            assert sum(sizes) == n and max(sizes) <= 65_536 and len(sizes) >= 2
            assert rt.totals.verified_bytes == n * 4096

    asyncio.run(main())


@pytest.mark.parametrize("answer", ["refuse", "wrong-disk"])
def test_fence_answers_that_do_not_fit_punch_nothing(site: Site, answer: str) -> None:
    image, channel = one_vm(site)
    config = site.config(fence=FAST_FENCE, reclaim={"retry_max_seconds": 60})

    def odd(fence: Fence) -> Any:
        if answer == "refuse":
            return "no fence capability"
        return [(s, n) for s, n in fence.ranges], fence.lease_ms

    async def main() -> None:
        async with running(config) as daemon:
            peer = AgentPeer(channel, on_fence=odd)
            if answer == "wrong-disk":
                original = peer._fence

                async def swap(fence: Fence) -> None:
                    await original(fence.model_copy(update={"disk": "disk9"}))

                peer._fence = swap  # type: ignore[method-assign]
            await peer.connect()
            seq = await peer.send_record([(0, MiB)])
            await peer.wait_answered(seq)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.last_attempt is not None)
            assert rt.last_attempt is not None and rt.last_attempt.outcome == "refused"
            assert rt.pending.records == 1
            await peer.close()

    asyncio.run(main())
    assert allocated(image) == 8 * MiB
