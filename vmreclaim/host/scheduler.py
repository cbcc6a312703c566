"""The scheduler: every served disk's state, and when each is reclaimed.

It keeps one :class:`~vmreclaim.host.disks.DiskRuntime` per disk the VM registry
reports (and the pending ranges of disks no VM has any more, kept until one does). New
records join a disk's pending ranges once they are durable (:meth:`Scheduler.committed`).
The scheduling loop asks the policy, through the pipeline's decide stage, about the
disks that changed (after commits, coalesced for ``DECIDE_COALESCE_SECONDS``) and about
all of them every ``reclaim.tick_seconds``; a disk the policy approves is reclaimed in
its own task, at most ``reclaim.parallel`` at once, by the reclaimer, and the outcome is
handed to the bookkeeping (:mod:`vmreclaim.host.bookkeeping`).

The scheduler knows the VMs only through :class:`ServedVMs`, the two questions it asks
the registry (the VM's fresh description, its agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from vmreclaim.core.config import ReclaimConfig
from vmreclaim.core.errors import VMReclaimError
from vmreclaim.core.hypervisors import VMInfo
from vmreclaim.core.model import MAX_RANGES_PER_RECORD, DeletionRecord, Disk, VMIdentity
from vmreclaim.core.opening import image_size, storage_state
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.policies import Decision, DiskState, Policy
from vmreclaim.host import budget
from vmreclaim.host.attempt import POSTPONED, Attempt
from vmreclaim.host.bookkeeping import ReclaimBook
from vmreclaim.host.disks import DiskRuntime
from vmreclaim.host.ingest import Incoming
from vmreclaim.host.logs import bug
from vmreclaim.host.metrics import HostMetrics
from vmreclaim.host.pending import PendingRanges, Snapshot
from vmreclaim.host.reclaimer import AgentLink, Reclaimer
from vmreclaim.host.store import DiskTotals

#: After commits, the scheduler waits this long to gather more before deciding again.
DECIDE_COALESCE_SECONDS = 0.02


class ServedVMs(Protocol):
    """What the scheduler asks about a VM before reclaiming one of its disks."""

    async def refresh(self, vm: str) -> VMInfo | str:
        """The hypervisor's description of ``vm`` now, or why there is none."""
        ...

    def agent(self, vm: str) -> AgentLink | None:
        """``vm``'s connected agent session, if any."""
        ...


class Scheduler:
    """Per-disk state and the decide → reclaim loop; see the module docstring."""

    def __init__(
        self,
        reclaim: ReclaimConfig,
        policy: Policy,
        policy_driver: str,
        pipeline: Pipeline,
        reclaimer: Reclaimer,
        metrics: HostMetrics,
    ) -> None:
        self._config = reclaim
        self._policy = policy
        self._policy_driver = policy_driver
        self._pipeline = pipeline
        self._reclaimer = reclaimer
        self._metrics = metrics
        self.disks: dict[str, DiskRuntime] = {}
        #: Pending records of disks no configured VM has (kept in the database).
        self.orphans: dict[str, PendingRanges] = {}
        self._dirty: set[str] = set()
        self._poke = asyncio.Event()
        self._slots = asyncio.Semaphore(reclaim.parallel)
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False

    # -- which disks ----------------------------------------------------------------------

    def load_orphans(self, pending: dict[str, PendingRanges]) -> None:
        """Pending ranges read from the database at start; they join their disks when seen."""
        self.orphans.update(pending)

    def track(self, disk: Disk, totals: DiskTotals | None = None) -> None:
        """Serve ``disk`` (new, or with a changed description)."""
        rt = self.disks.get(disk.key)
        if rt is None:
            rt = self.disks[disk.key] = DiskRuntime(disk)
            rt.pending = self.orphans.pop(disk.key, rt.pending)
            if totals is not None:
                rt.totals = totals
            self._metrics.pending.labels(disk.vm, disk.id).set(rt.pending.bytes_upper)
        rt.disk = disk

    def untrack(self, key: str) -> None:
        """Stop serving the disk ``key``; its pending ranges wait as an orphan."""
        rt = self.disks.pop(key, None)
        if rt is not None and rt.pending:
            self.orphans[key] = rt.pending

    def mark(self, keys: Iterable[str], *, retry_now: bool = False) -> None:
        """Decide about these disks soon (their records or their agent changed).

        ``retry_now``: what made their last attempts fail may be gone (an agent has
        just connected), so their retry backoff is forgotten. Without it, after a
        daemon restart the attempts made before the agent was back (postponed: no
        agent) had grown the backoff, and the reclaim waited it out with the agent
        there (issue 11 item 8).
        """
        keys = list(keys)
        if retry_now:
            for key in keys:
                rt = self.disks.get(key)
                if rt is not None:
                    rt.failures = 0
                    rt.retry_at = 0.0
        self._dirty.update(keys)
        self._poke.set()

    # -- records ----------------------------------------------------------------------------

    def admit(self, disk: Disk, record: DeletionRecord) -> str | None:
        """Why a valid record cannot be taken now (a full backlog), or ``None``."""
        rt = self.disks.get(disk.key)
        if rt is None:
            return f"disk {disk.key} is not served"
        # Bounded memory and database per disk, whatever a guest sends (host/budget.py).
        limit = budget.DEFAULT_LIMITS.ranges_per_disk
        if rt.pending.ranges_upper + len(record.ranges) > limit:
            return (
                f"disk {disk.key} already has {rt.pending.ranges_upper} pending ranges "
                f"(limit {limit}); refused, its blocks stay allocated"
            )
        return None

    def committed(self, batch: list[tuple[Incoming, int]]) -> None:
        """A batch is durable: track its ranges and tell the observers (before the acks)."""
        self._metrics.commits.inc()
        per_disk: dict[str, list[int]] = {}
        for item, rid in batch:
            rec = item.record
            size = rec.bytes
            rt = self.disks.get(item.key)
            if rt is None:
                self.orphans.setdefault(item.key, PendingRanges()).add(rid, item.received, rec.ranges, size)
                continue
            rt.pending.add(rid, item.received, rec.ranges, size)
            acc = per_disk.setdefault(item.key, [0, 0, 0])
            acc[0] += 1
            acc[1] += len(rec.ranges)
            acc[2] += size
            try:
                self._pipeline.record_received(VMIdentity(rt.disk.vm), rec)
            except Exception as exc:  # an observer's bug must not cost an ack
                bug("a vmreclaim_record_received hook failed", exc)
        # Counters once per disk and batch: a batch may hold thousands of records.
        m = self._metrics
        for key, (records, ranges, size) in per_disk.items():
            rt = self.disks[key]
            rt.totals.received_records += records
            rt.totals.received_bytes += size
            labels = (rt.disk.vm, rt.disk.id)
            m.records.labels(*labels).inc(records)
            m.ranges.labels(*labels).inc(ranges)
            m.deleted_bytes.labels(*labels).inc(size)
            m.pending.labels(*labels).set(rt.pending.bytes_upper)
        self.mark(per_disk)

    # -- deciding ----------------------------------------------------------------------------

    async def run(self, vms: ServedVMs, book: ReclaimBook) -> None:
        """The scheduling loop (runs until cancelled)."""
        tick = self._config.tick_seconds
        next_tick = time.monotonic()
        self._poke.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), max(0.0, next_tick - time.monotonic()))
            self._poke.clear()
            mono = time.monotonic()
            if mono >= next_tick:
                keys: set[str] = set(self.disks)
                next_tick = mono + tick
                book.save_policy_soon()
            else:
                keys = self._dirty
            self._dirty = set()
            now = time.time()
            for key in keys:
                rt = self.disks.get(key)
                if rt is not None:
                    self._evaluate(rt, vms, book, now, mono)
            await asyncio.sleep(DECIDE_COALESCE_SECONDS)

    def force(self, key: str) -> None:
        """Reclaim disk ``key``'s pending ranges without asking the policy (the operator)."""
        rt = self.disks.get(key)
        if rt is not None:
            rt.forced = True
            self.mark([key])

    def _evaluate(self, rt: DiskRuntime, vms: ServedVMs, book: ReclaimBook, now: float, mono: float) -> None:
        if not rt.pending:
            rt.forced = False
        if self._stopping or rt.busy or not rt.pending or mono < rt.retry_at:
            return
        if rt.forced:
            rt.last_decision = Decision(True, "the operator asked (vmreclaim reclaim)")
            rt.busy = True
            self._spawn(self._reclaim(rt, vms, book), f"reclaim:{rt.disk.key}")
            return
        try:
            # A named image (rbd:...) answers through its driver: the pool's usage.
            size = image_size(rt.disk.path)
            storage = storage_state(rt.disk.path)
        except (OSError, VMReclaimError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            rt.last_decision = Decision(False, f"image {rt.disk.path} cannot be read: {why}")
            return
        state = DiskState(
            rt.disk.key, size, rt.pending.bytes_upper, rt.totals.last_reclaim, rt.pending.oldest_received
        )
        try:
            decision = self._pipeline.decide(rt.disk, self._policy, state, storage, now)
        except Exception as exc:  # a policy plugin's bug: no reclaim, and say so
            bug(f"policy {self._policy_driver} failed to decide", exc)
            decision = Decision(False, f"policy failed: {exc}")
        rt.last_decision = decision
        if decision.reclaim:
            rt.busy = True
            self._spawn(self._reclaim(rt, vms, book), f"reclaim:{rt.disk.key}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    # -- reclaiming --------------------------------------------------------------------------

    async def _reclaim(self, rt: DiskRuntime, vms: ServedVMs, book: ReclaimBook) -> None:
        snap: Snapshot | None = None
        try:
            async with self._slots:
                if self._stopping:
                    return
                snap = rt.pending.snapshot(MAX_RANGES_PER_RECORD)
                if snap is None:
                    return
                started = time.time()
                attempt = await self._attempt(rt, vms, snap)
            # Bookkeeping waits for the database thread, not for a reclaim slot.
            await book.finish(rt, snap, attempt, started)
            snap = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            bug(f"reclaim of {rt.disk.key} failed", exc)
            rt.back_off(self._config.retry_max_seconds)
        finally:
            if snap is not None:
                rt.pending.abandon()
            rt.busy = False
            if rt.pending:
                self.mark([rt.disk.key])

    async def _attempt(self, rt: DiskRuntime, vms: ServedVMs, snap: Snapshot) -> Attempt:
        info = await vms.refresh(rt.disk.vm)
        if isinstance(info, str):
            return Attempt("none", POSTPONED, info)
        disk = info.disk(rt.disk.id)
        if disk is None:
            return Attempt("none", POSTPONED, f"VM {rt.disk.vm} no longer has disk {rt.disk.id}")
        rt.disk = disk
        return await self._reclaimer.attempt(disk, info, vms.agent(rt.disk.vm), snap)

    # -- stopping ----------------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Start no reclaim; let those in flight finish within ``timeout``, cancel the rest."""
        self._stopping = True
        if self._running:
            _, late = await asyncio.wait(list(self._running), timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
