"""When and how the daemon reconciles its disks, and the operator's ``reclaim VM``.

:class:`Reconciliations` keeps, per disk, what :mod:`vmreclaim.host.reconcile` needs
(:class:`~vmreclaim.host.reconcile.DiskReconcile`), asks the agent for a disk's free
space when :class:`~vmreclaim.host.reconcile.ReconcileClock` says it is due, intersects
it with the image off the event loop, and hands the result to the daemon as records.

It reaches the daemon only through :class:`ReconcileSite` and the agent only through
:class:`ReconcileSession` (STYLE 24: collaborators handed in, never the owner).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vmreclaim.core.errors import ChannelError, FenceError, ProtocolError, UsageError, VMReclaimError
from vmreclaim.core.model import DeletionRecord, Disk
from vmreclaim.core.ranges import RangeSet
from vmreclaim.host.logs import bug, event
from vmreclaim.host.reconcile import (
    DiskReconcile,
    FreeSpaceAnswer,
    ReconcileClock,
    Reconciled,
    as_records,
)


class ReconcileSession(Protocol):
    """What reconciliation needs of an agent connection."""

    @property
    def can_reconcile(self) -> bool: ...

    #: When the connection was made (Unix time): a new value is a reconnection.
    connected_at: float

    async def free_space(self, disk: Disk, timeout: float) -> FreeSpaceAnswer: ...


@dataclass(frozen=True)
class DiskProgress:
    """What the daemon says of one disk right now."""

    pending: RangeSet
    busy: bool
    punched_bytes: int
    freed_bytes: int
    mode: str | None
    waiting: str | None


class ReconcileSite(Protocol):
    """What reconciliation needs of the daemon."""

    def session_of(self, vm: str) -> ReconcileSession | None: ...

    def disks_of(self, vm: str) -> list[Disk] | None: ...

    def intersect(self, disk: Disk, free: RangeSet) -> Awaitable[Reconciled]: ...

    def submit(self, disk: Disk, record: DeletionRecord) -> Awaitable[None]: ...

    def force(self, disk: Disk) -> None: ...

    def progress(self, disk: Disk) -> DiskProgress: ...


class Reconciliations:
    """Per-disk reconciliation state and runs (see the module docstring)."""

    def __init__(self, site: ReconcileSite, clock: ReconcileClock, *, timeout: float, enabled: bool) -> None:
        self.site = site
        self.clock = clock
        self.timeout = timeout
        self.enabled = enabled
        self.states: dict[str, DiskReconcile] = {}
        self._running: dict[str, asyncio.Task[Reconciled | None]] = {}
        #: The agent session last seen per VM: a new one is a (re)connection.
        self._seen: dict[str, float | None] = {}
        #: Told after every completed reconciliation (the report's gauges).
        self.on_reconciled: Callable[[Disk, DiskReconcile], None] | None = None

    async def run(self, tick_seconds: float, vms: Callable[[], list[str]]) -> None:
        """Every ``tick_seconds``: notice new agents, start what is due (until cancelled)."""
        while True:
            for vm in vms():
                session = self.site.session_of(vm)
                disks = self.site.disks_of(vm) or []
                ident = session.connected_at if session is not None else None
                if self._seen.get(vm) != ident:
                    self._seen[vm] = ident
                    if session is not None:
                        self.connected(disks)
                try:
                    self.tick(disks)
                except Exception as exc:  # one VM's trouble must not stop the others' runs
                    bug(f"reconciliation check of VM {vm} failed", exc)
            await asyncio.sleep(tick_seconds)

    def state(self, disk: Disk) -> DiskReconcile:
        return self.states.setdefault(disk.key, DiskReconcile())

    def connected(self, disks: list[Disk]) -> None:
        """An agent (re)connected: its view of free space may have changed meanwhile."""
        for disk in disks:
            st = self.state(disk)
            if st.wanted != "operator":
                st.wanted = "connect"
                st.asked_mono = None

    def tick(self, disks: list[Disk]) -> None:
        """Start the reconciliations that are due (called on the scheduler's tick)."""
        if not self.enabled:
            return
        mono = time.monotonic()
        for disk in disks:
            if disk.key in self._running:
                continue
            session = self.site.session_of(disk.vm)
            if session is None or not session.can_reconcile:
                continue
            st = self.state(disk)
            try:
                allocated: int | None = os.stat(disk.path).st_blocks * 512
            except OSError:
                allocated = None
            if allocated is not None and st.allocated_at_last is not None:
                # Growth counts from the lowest point since the last run: punches lower it.
                st.allocated_at_last = min(st.allocated_at_last, allocated)
            reason = self.clock.due(st, allocated=allocated, now_mono=mono)
            if reason is not None:
                self.start(disk, reason)

    def start(self, disk: Disk, reason: str, *, dry_run: bool = False) -> asyncio.Task[Reconciled | None]:
        running = self._running.get(disk.key)
        if running is not None:
            return running
        task = asyncio.get_running_loop().create_task(self._run(disk, reason, dry_run))
        self._running[disk.key] = task
        task.add_done_callback(lambda _t: self._running.pop(disk.key, None))
        return task

    async def _run(self, disk: Disk, reason: str, dry_run: bool) -> Reconciled | None:
        st = self.state(disk)
        st.wanted = None
        st.asked_mono = time.monotonic()
        try:
            st.allocated_at_last = os.stat(disk.path).st_blocks * 512
        except OSError:
            st.allocated_at_last = None
        session = self.site.session_of(disk.vm)
        if session is None or not session.can_reconcile:
            st.last_error = f"no agent of VM {disk.vm} that can reconcile is connected"
            return None
        started = time.monotonic()
        try:
            answer = await session.free_space(disk, self.timeout)
            result = await self.site.intersect(disk, answer.free)
        except (ProtocolError, ChannelError, FenceError, ConnectionError) as exc:
            st.last_error = str(exc)
            event(logging.WARNING, "reconcile.failed", disk=disk.key, reason=reason, error=str(exc))
            return None
        except VMReclaimError as exc:
            st.last_error = str(exc)
            event(logging.ERROR, "reconcile.failed", disk=disk.key, reason=reason, error=str(exc))
            return None
        st.last_error = None
        st.last_at = time.time()
        st.reclaimable = result.reclaimable
        st.reclaimable_bytes = result.reclaimable.total
        st.free_bytes = result.free_bytes
        if self.on_reconciled is not None:
            self.on_reconciled(disk, st)
        submitted = 0
        if not dry_run and result.reclaimable:
            submitted = await self._submit(disk, result.reclaimable)
        event(
            logging.INFO,
            "reconcile.done",
            disk=disk.key,
            reason=reason,
            free_bytes=result.free_bytes,
            reclaimable_bytes=result.reclaimable.total,
            submitted_bytes=submitted,
            partial=answer.partial,
            seconds=round(time.monotonic() - started, 3),
            intersect_seconds=round(result.seconds, 3),
        )
        return result

    async def _submit(self, disk: Disk, ranges: RangeSet) -> int:
        """Store ``ranges`` as records; their bytes once all are durable."""
        records = as_records(disk.vm, disk.id, ranges)
        results = await asyncio.gather(*(self.site.submit(disk, r) for r in records), return_exceptions=True)
        stored = 0
        for record, outcome in zip(records, results, strict=True):
            if isinstance(outcome, BaseException):
                event(logging.WARNING, "reconcile.not_stored", disk=disk.key, error=str(outcome))
            else:
                stored += record.bytes
        return stored

    # -- the operator's request -------------------------------------------------------------

    async def operator(self, vm: str, disk_id: str | None, *, dry_run: bool, wait: bool) -> dict[str, Any]:
        """``vmreclaim reclaim VM``: reconcile now; with ``wait``, until reclaimed."""
        disks = self.site.disks_of(vm)
        if disks is None:
            raise UsageError(f"VM {vm!r} is not served by this host daemon")
        if disk_id is not None:
            disks = [d for d in disks if d.id == disk_id]
            if not disks:
                have = ", ".join(d.id for d in self.site.disks_of(vm) or []) or "none"
                raise UsageError(f"VM {vm!r} has no disk {disk_id!r} (its disks: {have})")
        session = self.site.session_of(vm)
        if session is None:
            raise UsageError(f"VM {vm!r} has no agent connected: nothing can reconcile its disks")
        if not session.can_reconcile:
            raise UsageError(f"the agent of VM {vm!r} speaks a protocol without reconciliation")
        before = {d.key: self.site.progress(d) for d in disks}
        for d in disks:
            self.state(d).wanted = "operator"
        tasks = [self.start(d, "operator", dry_run=dry_run) for d in disks]
        results = await asyncio.gather(*tasks)
        out = []
        for disk, result in zip(disks, results, strict=True):
            st = self.state(disk)
            if result is None:
                raise ChannelError(f"reconciliation of {disk.key} failed: {st.last_error}")
            punched = freed = 0
            if not dry_run and result.reclaimable:
                self.site.force(disk)
                if wait:
                    await self._until_done(disk, result.reclaimable)
                    now = self.site.progress(disk)
                    punched = now.punched_bytes - before[disk.key].punched_bytes
                    freed = now.freed_bytes - before[disk.key].freed_bytes
            out.append(
                {
                    "id": disk.id,
                    "reclaimable_bytes": result.reclaimable.total,
                    "punched_bytes": punched,
                    "freed_bytes": freed,
                    "mode": self.site.progress(disk).mode,
                }
            )
        return {"vm": vm, "disks": out}

    async def _until_done(self, disk: Disk, ranges: RangeSet) -> None:
        """Until none of ``ranges`` is pending and no reclaim runs (or the timeout)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            now = self.site.progress(disk)
            if not now.busy and not now.pending.intersect(ranges):
                return
            self.site.force(disk)
            await asyncio.sleep(0.1)
        raise FenceError(
            f"{disk.key}: the reconciled ranges were not all reclaimed within {self.timeout:.0f}s "
            f"({self.site.progress(disk).waiting or 'still pending'})"
        )

    def report(
        self, disk: Disk, virtual_bytes: int | None, allocated_bytes: int | None, data: RangeSet | None
    ) -> dict[str, Any]:
        """One disk's ``vmreclaim report`` entry (DESIGN.md section 8).

        ``data`` is the image's data map now: what the last reconciliation found free is
        reclaimable *now* only where the file still stores it (punches since then, and
        the guest's own writes into the image, are taken off).
        """
        st = self.state(disk)
        now = self.site.progress(disk)
        reclaimable = None
        if st.last_at is not None:
            reclaimable = (st.reclaimable.intersect(data) if data is not None else st.reclaimable).total
        return {
            "id": disk.id,
            "virtual_bytes": virtual_bytes,
            "allocated_bytes": allocated_bytes,
            "reclaimable_bytes": reclaimable,
            "reclaimable_as_of": st.last_at,
            "reclaimable_age_seconds": (time.time() - st.last_at) if st.last_at is not None else None,
            "pending_bytes": now.pending.total,
            "freed_bytes": now.freed_bytes,
            "punched_bytes": now.punched_bytes,
            "mode": now.mode,
            "waiting": now.waiting,
            "last_error": st.last_error,
        }

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        for task in list(self._running.values()):
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                bug("a reconciliation failed while stopping", exc)
