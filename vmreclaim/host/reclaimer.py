"""One reclaim attempt of one disk, in the one mode that is safe now (DESIGN.md section 4).

For one disk and a snapshot of its pending ranges, :class:`Reclaimer` picks the one
safe way to reclaim (:func:`choose_mode`, DESIGN.md section 4) and runs it:

``trim``
    The disk passes discards and the agent can FITRIM: the guest kernel trims exactly
    the ranges, which its allocator makes safe; the host only measures what was freed.
``fence``
    An agent is connected (the filesystem is live): ask it to freeze and re-verify,
    and once ``fence_ready`` is in, open the image *afresh* (no cached L2 table or BAT
    survives from before the fence), translate only the re-verified ranges, and punch
    them under a :class:`~vmreclaim.core.lease.Lease` that ends a safety margin before
    the agent's (the lease counts from when the request was *sent*). Release always
    follows. While the VM runs, the hypervisor must be able to report block jobs and
    report none, checked before the fence and again once it is up.
``offline``
    No agent, the VM is not running, no process holds the image (QEMU's locks, taken
    by us for the whole punch) and no loop device is attached to it. The records were
    verified by a guest that may have run on since, so they are re-verified against the
    free space the guest filesystem's own structures show (the ``filesystems`` plugin
    kind, read by :func:`vmreclaim.core.sparsify.scan_free_space`, the scan of
    ``image sparsify``); ranges that cannot be verified stay pending.

Anything else waits (outcome ``postponed``), with the reason shown in ``vmreclaim
status``. Every punch goes through :meth:`Pipeline.reclaim
<vmreclaim.core.pipeline.Pipeline.reclaim>`: the same translate, filter and punch as
the offline commands.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from vmreclaim.core.errors import (
    FenceError,
    HypervisorError,
    ImageBusyError,
    ImageError,
    VMReclaimError,
)
from vmreclaim.core.hypervisors import Hypervisor, VMInfo
from vmreclaim.core.lease import Lease
from vmreclaim.core.locks import hold_for_writing
from vmreclaim.core.model import Disk
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.protocol import FenceReady, FenceRefused, TrimDone, pairs_to_ranges
from vmreclaim.core.punch import allocated_bytes
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.core.reclaim import ReclaimReport, only_allocated, plan_reclaim
from vmreclaim.core.sparsify import scan_free_space
from vmreclaim.host.attempt import DONE, EXPIRED, FAILED, POSTPONED, REFUSED, Attempt
from vmreclaim.host.images import ImageOpener
from vmreclaim.host.logs import event
from vmreclaim.host.pending import Snapshot

T = TypeVar("T")


class AgentLink(Protocol):
    """What the reclaimer asks of a VM's agent session (an
    :class:`~vmreclaim.host.session.AgentSession` is one): questions about a disk, and
    the fence and trim requests. It never reads or changes the session's fields."""

    @property
    def name(self) -> str: ...

    @property
    def live(self) -> bool: ...

    @property
    def fence_lock(self) -> asyncio.Lock: ...

    def mode_of(self, disk_id: str) -> str | None: ...

    def mismatch(self, disk_id: str) -> str | None: ...

    def can_fence(self) -> bool: ...

    def capability_names(self) -> list[str]: ...

    def stop_trimming(self, disk_id: str) -> None: ...

    async def fence(
        self, disk: Disk, ranges: RangeSet, lease_seconds: float, wait: float
    ) -> tuple[int, float, FenceReady | FenceRefused]: ...

    def hold(self, fid: int, lease: Lease) -> None: ...

    async def release(self, fid: int) -> str | None: ...

    async def trim(self, disk: Disk, ranges: RangeSet, timeout: float) -> TrimDone | FenceRefused: ...


@dataclass(frozen=True)
class ModeChoice:
    mode: str | None
    reason: str


def choose_mode(
    info: VMInfo,
    disk: Disk,
    agent: AgentLink | None,
    hypervisor: Hypervisor,
    loop_device: str | None,
) -> ModeChoice:
    """The safe way to reclaim ``disk`` now, or ``None`` and why not (pure, no I/O)."""
    if agent is not None and agent.live:
        mismatch = agent.mismatch(disk.id)
        if mismatch is not None:
            return ModeChoice(None, mismatch)
        if agent.mode_of(disk.id) == "trim":
            return ModeChoice("trim", "the disk passes discards and the agent can trim")
        if not agent.can_fence():
            return ModeChoice(
                None,
                f"the agent of {info.identity} cannot fence (capabilities: "
                f"{', '.join(agent.capability_names()) or 'none'})",
            )
        if info.running and not type(hypervisor).capabilities.block_jobs:
            return ModeChoice(
                None,
                f"VM {info.identity} runs and hypervisor driver {type(hypervisor).__name__} cannot "
                "report block jobs, so its disks are reclaimed only in guest-trim mode",
            )
        return ModeChoice("fence", "an agent is connected")
    if info.running:
        return ModeChoice(None, f"VM {info.identity} runs and its agent is not connected")
    if loop_device is not None:
        return ModeChoice(None, f"{disk.path} is attached to {loop_device}, which may be mounted")
    return ModeChoice("offline", "the VM is not running and no agent is connected")


def loop_device_of(path: Path) -> str | None:
    """The loop device backed by ``path``, if any (``/sys/block/loop*/loop/backing_file``)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    sys_block = Path("/sys/block")
    try:
        entries = list(sys_block.glob("loop*/loop/backing_file"))
    except OSError:
        return None
    for backing in entries:
        try:
            name = backing.read_text().strip()
            other = os.stat(name.removesuffix(" (deleted)"))
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return f"/dev/{backing.parent.parent.name}"
    return None


@dataclass(frozen=True)
class NotNow:
    """An attempt stopped before any write, for a reason that is not an error (a block
    job, a loop device); the attempt is postponed with this reason."""

    reason: str


class Reclaimer:
    """Runs reclaim attempts; see the module docstring."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        pipeline: Pipeline,
        executor: Executor,
        images: ImageOpener,
        *,
        lease_seconds: float,
        margin_seconds: float,
        trim_timeout: float,
    ) -> None:
        self.hypervisor = hypervisor
        self.pipeline = pipeline
        self.executor = executor
        self.lease_seconds = lease_seconds
        self.margin_seconds = margin_seconds
        self.trim_timeout = trim_timeout
        self.images = images

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def attempt(self, disk: Disk, info: VMInfo, agent: AgentLink | None, snap: Snapshot) -> Attempt:
        live = agent is not None and agent.live
        # Only the offline mode cares about loop devices (a sysfs walk): skip it otherwise.
        loop_dev = None if live else loop_device_of(disk.path)
        choice = choose_mode(info, disk, agent, self.hypervisor, loop_dev)
        if choice.mode is None:
            return Attempt("none", POSTPONED, choice.reason)
        if choice.mode == "trim":
            assert agent is not None
            return await self._trim(disk, agent, snap.ranges)
        if choice.mode == "fence":
            assert agent is not None
            return await self._fenced(disk, info, agent, snap.ranges)
        return await self._offline(disk, snap.ranges)

    # -- guest trim ------------------------------------------------------------------------

    async def _trim(self, disk: Disk, agent: AgentLink, asked: RangeSet) -> Attempt:
        requested = asked.total
        try:
            ranges = await self._thread(self._trimmable, disk, asked)
        except (ImageError, OSError, VMReclaimError) as exc:
            return Attempt("trim", FAILED, str(exc), requested_bytes=requested)
        if not ranges:
            return Attempt("trim", DONE, "the plan leaves nothing to trim", requested_bytes=requested)
        async with agent.fence_lock:
            before = await self._thread(allocated_bytes, disk.path)
            try:
                reply = await agent.trim(disk, ranges, self.trim_timeout)
            except FenceError as exc:
                return Attempt("trim", REFUSED, str(exc), requested_bytes=requested)
            if isinstance(reply, FenceRefused):
                return Attempt(
                    "trim", REFUSED, f"agent refused to trim: {reply.error}", requested_bytes=requested
                )
            freed = before - await self._thread(allocated_bytes, disk.path)
            if reply.error and not reply.trimmed_bytes:
                if "EOPNOTSUPP" in reply.error or "not supported" in reply.error:
                    # The guest's disk takes no discards after all: fence from now on.
                    agent.stop_trimming(disk.id)
                return Attempt(
                    "trim", REFUSED, f"agent could not trim: {reply.error}", requested_bytes=requested
                )
        report = ReclaimReport(requested, reply.trimmed_bytes, freed, [], mode="trim")
        self.pipeline.trimmed(disk, report)
        return Attempt(
            "trim",
            DONE,
            f"guest trimmed {reply.trimmed_bytes} bytes" + (f" ({reply.error})" if reply.error else ""),
            requested_bytes=requested,
            verified_bytes=reply.trimmed_bytes,
            punched_bytes=reply.trimmed_bytes,
            freed_bytes=freed,
        )

    def _trimmable(self, disk: Disk, asked: RangeSet) -> RangeSet:
        """What the guest may trim of ``asked``: the guest ranges of the filtered plan
        (:meth:`Pipeline.translate`), so a ``translate_filter`` veto holds in this mode
        as in every other; a range the plan drops is never sent to the guest."""
        with self.images.open(disk) as image:
            ranges = asked.clip(ByteRange(0, image.virtual_size))
            if not ranges:
                return ranges
            return self.pipeline.translate(disk, image, ranges).guest_ranges

    # -- fenced host punch -----------------------------------------------------------------

    def _block_jobs(self, info: VMInfo, disk: Disk) -> NotNow | None:
        """Why ``disk`` must not be punched now because of block jobs, or ``None``."""
        if not info.running:
            return None  # no hypervisor process has the image open: no block job can run
        try:
            jobs = self.hypervisor.block_jobs(info.identity, disk)
        except HypervisorError as exc:
            return NotNow(f"cannot ask for block jobs on {disk.key}: {exc}")
        if jobs:
            return NotNow(f"block job {', '.join(jobs)} runs on {disk.key}")
        return None

    async def _fenced(self, disk: Disk, info: VMInfo, agent: AgentLink, ranges: RangeSet) -> Attempt:
        requested = ranges.total
        jobs = await self._thread(self._block_jobs, info, disk)
        if jobs is not None:
            return Attempt("fence", POSTPONED, jobs.reason, requested_bytes=requested)
        try:
            ranges = await self._thread(self._holding, disk, ranges)
        except (ImageError, OSError, VMReclaimError) as exc:
            return Attempt("fence", FAILED, str(exc), requested_bytes=requested)
        if not ranges:
            # Freezing a guest to punch what is already a hole would free nothing.
            return Attempt(
                "fence",
                DONE,
                "no asked range holds storage in the image: no fence",
                requested_bytes=requested,
            )
        verified = RangeSet()
        async with agent.fence_lock:
            wait = self.lease_seconds - self.margin_seconds
            try:
                fid, sent_at, reply = await agent.fence(disk, ranges, self.lease_seconds, wait)
            except FenceError as exc:
                return Attempt("fence", REFUSED, str(exc), requested_bytes=requested)
            if isinstance(reply, FenceRefused):
                return Attempt(
                    "fence", REFUSED, f"agent refused fence {fid}: {reply.error}", requested_bytes=requested
                )
            granted = min(self.lease_seconds, reply.lease_ms / 1000)
            # The guest filesystem is frozen from here until fence.released.
            event(logging.DEBUG, "fence.granted", vm=info.identity.name, fence=fid, lease_seconds=granted)
            lease = Lease.starting(sent_at, granted, self.margin_seconds, what=f"fence {fid} on {disk.key}")
            agent.hold(fid, lease)
            try:
                if reply.disk != disk.id:
                    return Attempt(
                        "fence",
                        REFUSED,
                        f"agent answered fence {fid} for disk {reply.disk!r}, not {disk.id!r}",
                        requested_bytes=requested,
                    )
                # The agent can only narrow what was asked; anything else is ignored.
                verified = pairs_to_ranges(reply.ranges).intersect(ranges)
                if not verified:
                    return Attempt(
                        "fence", DONE, "no range was still free under the fence", requested_bytes=requested
                    )
                report = await self._thread(self._punch_live, info, disk, verified, lease)
                if isinstance(report, NotNow):
                    return Attempt("fence", POSTPONED, report.reason, requested_bytes=requested)
            except FenceError as exc:
                return Attempt(
                    "fence", EXPIRED, str(exc), requested_bytes=requested, verified_bytes=verified.total
                )
            except (ImageError, ImageBusyError, OSError, VMReclaimError) as exc:
                return Attempt("fence", FAILED, str(exc), requested_bytes=requested)
            finally:
                why = await agent.release(fid)
                frozen = time.monotonic() - sent_at
                event(
                    logging.DEBUG,
                    "fence.released",
                    vm=agent.name,
                    fence=fid,
                    why=why,
                    seconds=round(frozen, 4),
                )
        return Attempt(
            "fence",
            DONE,
            f"fence {fid}: {len(verified)} re-verified ranges",
            requested_bytes=requested,
            verified_bytes=verified.total,
            punched_bytes=report.punched_bytes,
            freed_bytes=report.freed_bytes,
            fence_seconds=frozen,
        )

    def _holding(self, disk: Disk, ranges: RangeSet) -> RangeSet:
        """The part of ``ranges`` a punch could free, read before any fence: every guest
        byte the plan skips (unallocated, zero, already a hole, shared, ...) is dropped.

        Reading the image unfenced is safe here because it only ever narrows: a byte
        dropped now is not punched, and the fence re-reads the mapping for what is kept.
        The agent's report of the space already free at its start is mostly such bytes.
        """
        with self.images.open(disk) as image:
            asked = ranges.clip(ByteRange(0, image.virtual_size))
            if not asked:
                return asked
            file = image.data_file
            plan = only_allocated(plan_reclaim(image, asked, file.punch_block_size(file.fd)), file, file.fd)
            return asked.subtract(RangeSet.from_ranges((s.start, s.length) for s in plan.skipped))

    def _punch_live(
        self, info: VMInfo, disk: Disk, verified: RangeSet, lease: Lease
    ) -> ReclaimReport | NotNow:
        """Inside the fence, on a worker thread: re-check, translate afresh, punch."""
        lease.check()
        jobs = self._block_jobs(info, disk)
        if jobs is not None:
            return jobs
        with self.images.open(disk) as image:
            ranges = verified.clip(ByteRange(0, image.virtual_size))
            if not ranges:
                return ReclaimReport(verified.total, 0, 0, [])
            try:
                fd = os.open(image.data_file.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise ImageError(f"{image.data_file.path}: cannot open for punching: {exc.strerror}") from exc
            try:
                return self.pipeline.reclaim(disk, image, ranges, fd=fd, lease=lease)
            finally:
                os.close(fd)

    # -- offline ---------------------------------------------------------------------------

    async def _offline(self, disk: Disk, ranges: RangeSet) -> Attempt:
        try:
            outcome = await self._thread(self._punch_offline, disk, ranges)
        except ImageBusyError as exc:  # a VM or another tool holds the image: not now
            return Attempt("offline", POSTPONED, str(exc), requested_bytes=ranges.total)
        except (ImageError, OSError, VMReclaimError) as exc:
            return Attempt("offline", FAILED, str(exc), requested_bytes=ranges.total)
        if isinstance(outcome, NotNow):
            return Attempt("offline", POSTPONED, outcome.reason, requested_bytes=ranges.total)
        report, verified, unverifiable, note = outcome
        return Attempt(
            "offline",
            DONE,
            note,
            requested_bytes=ranges.total,
            verified_bytes=verified,
            punched_bytes=report.punched_bytes if report else 0,
            freed_bytes=report.freed_bytes if report else 0,
            still_pending=unverifiable,
        )

    def _punch_offline(
        self, disk: Disk, ranges: RangeSet
    ) -> tuple[ReclaimReport | None, int, RangeSet, str] | NotNow:
        """Verify ``ranges`` against the guest filesystems' own free space, then punch
        those verified; ``(report, verified bytes, ranges still pending, note)``."""
        # Lock first, then read: no QEMU can start writing between our verification and
        # our punch (it would see our locks and fail, as under a running VM it would).
        with ExitStack() as stack:
            fd = stack.enter_context(hold_for_writing(disk.path))
            loop_dev = loop_device_of(disk.path)
            if loop_dev is not None:
                return NotNow(f"{disk.path} is attached to {loop_dev}, which may be mounted")
            image = stack.enter_context(self.images.open(disk))
            if image.data_file.path != image.file.path:
                fd = stack.enter_context(hold_for_writing(image.data_file.path))
            asked = ranges.clip(ByteRange(0, image.virtual_size))
            scan = scan_free_space(image)
            verified = asked.intersect(scan.free)
            unverifiable = asked.subtract(scan.covered)
            note = f"{verified.total} of {ranges.total} bytes verified free offline"
            if scan.skipped:
                note += "; not verified: " + "; ".join(scan.skipped)
            if not verified:
                return None, 0, unverifiable, note
            report = self.pipeline.reclaim(disk, image, verified, fd=fd)
            return report, verified.total, unverifiable, note
