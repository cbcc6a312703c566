"""``vmreclaim host``: the daemon that receives deletion records and reclaims them.

:class:`HostDaemon` owns one of each: the hypervisor driver (which VMs, their disks and
channels), the policy driver, the deletion database, the committer, the reclaimer, the
status socket and the optional Prometheus endpoint; and per VM a listener on its
channel and at most one agent session. Its event loop does the protocol and the
bookkeeping; SQLite runs on one database thread and image work (opening, translating,
punching, filesystem reads) on a small pool, so a slow disk never stalls the agents.

Life of a record: a session validates it → the committer stores it durably → the
session acks it → the disk's pending ranges grow → the scheduler asks the policy
(after commits, and every ``reclaim.tick_seconds``) → the reclaimer runs one safe
attempt (:mod:`vmreclaim.host.reclaimer`) → the result is stored with the records it
handled removed, in one transaction → the policy learns the host storage state and the
freed bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vmreclaim import __version__
from vmreclaim.core import loader
from vmreclaim.core.config import HostConfig
from vmreclaim.core.errors import HypervisorError, VMReclaimError
from vmreclaim.core.hypervisors import Hypervisor, VMEvent, VMInfo
from vmreclaim.core.model import MAX_RANGES_PER_RECORD, DeletionRecord, Disk, VMIdentity
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.plugins import Plugins
from vmreclaim.core.policies import Decision, DiskState, Policy, StorageState
from vmreclaim.core.transports import Transport
from vmreclaim.host.ingest import Committer, Incoming
from vmreclaim.host.logs import bug, event, setup_logging
from vmreclaim.host.metrics import HostMetrics
from vmreclaim.host.pending import PendingRanges, Snapshot
from vmreclaim.host.reclaimer import POSTPONED, Attempt, Reclaimer
from vmreclaim.host.session import AgentSession
from vmreclaim.host.status import StatusServer
from vmreclaim.host.store import DeletionStore, DiskTotals, Finish, ReclaimRow, StoredRecord

T = TypeVar("T")

#: A disk refuses new records while this many ranges wait for it (bounded memory and
#: database per disk, whatever a guest sends); its agent gets a ``nack`` saying so.
MAX_PENDING_RANGES = 4_000_000
#: After commits, the scheduler waits this long to gather more before deciding again.
DECIDE_COALESCE_SECONDS = 0.02
#: Rejections logged per VM per minute; the rest are counted only.
REJECT_LOGS_PER_MINUTE = 20


@dataclass
class DiskRuntime:
    """One disk as the daemon tracks it."""

    disk: Disk
    pending: PendingRanges = field(default_factory=PendingRanges)
    totals: DiskTotals = field(default_factory=DiskTotals)
    busy: bool = False
    failures: int = 0
    #: ``time.monotonic()`` before which the disk is not tried again.
    retry_at: float = 0.0
    last_decision: Decision | None = None
    last_attempt: Attempt | None = None
    last_attempt_at: float | None = None


@dataclass
class VMRuntime:
    """One VM: the hypervisor's last word on it, its listener and its agent."""

    info: VMInfo
    listener: asyncio.Task[None] | None = None
    session: AgentSession | None = None
    rejected: int = 0
    _log_window: float = 0.0
    _logged: int = 0


class HostDaemon:
    """The host daemon; :func:`run_host` runs one until SIGTERM/SIGINT."""

    def __init__(
        self,
        config: HostConfig,
        *,
        hypervisor: Hypervisor | None = None,
        policy: Policy | None = None,
        plugins: Plugins | None = None,
    ) -> None:
        self.config = config
        self.hypervisor = hypervisor or loader.load_driver(
            "hypervisors", config.hypervisor.driver, Hypervisor, config.hypervisor.options
        )
        self.policy = policy or loader.load_driver(
            "policies", config.policy.driver, Policy, config.policy.options
        )
        self.pipeline = Pipeline(plugins)
        self.metrics = HostMetrics()
        self.vms: dict[str, VMRuntime] = {}
        self.disks: dict[str, DiskRuntime] = {}
        #: Pending records of disks no configured VM has (kept in the database).
        self.orphans: dict[str, PendingRanges] = {}
        self.rejected_total = 0
        self.started = time.time()
        self._db = ThreadPoolExecutor(1, thread_name_prefix="vmreclaim-db")
        self._work = ThreadPoolExecutor(config.reclaim.parallel + 2, thread_name_prefix="vmreclaim-work")
        self.reclaimer = Reclaimer(
            self.hypervisor,
            self.pipeline,
            self._work,
            lease_seconds=config.fence.lease_seconds,
            margin_seconds=config.fence.margin_seconds,
            trim_timeout=config.reclaim.trim_timeout_seconds,
        )
        self.store: DeletionStore | None = None
        self._committer: Committer | None = None
        self.status = StatusServer(config.status_socket, self.status_document)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._critical: list[asyncio.Task[None]] = []
        self._dirty: set[str] = set()
        self._poke = asyncio.Event()
        self._rescan_now = asyncio.Event()
        self._slots = asyncio.Semaphore(config.reclaim.parallel)
        self._stopping = False
        self._saved_policy: dict[str, Any] | None = None

    @property
    def committer(self) -> Committer:
        assert self._committer is not None, "the daemon has not started"
        return self._committer

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._work, fn, *args)

    async def _db_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, lambda: fn(*args, **kwargs))

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, list the VMs, listen on every channel; raise if unusable."""
        cfg = self.config
        self.store = await self._db_call(DeletionStore, cfg.database)
        try:
            infos = await self._thread(self.hypervisor.vms)
        except HypervisorError:
            await self._db_call(self.store.close)
            raise
        state = await self._db_call(self.store.policy_state, cfg.policy.driver)
        if state is not None:
            self.policy.restore(state)
        totals = await self._db_call(self.store.totals)
        rejected = await self._db_call(self.store.rejected)
        self.rejected_total = sum(rejected.values())
        loads = await self._db_call(self.store.pending_by_disk)
        for key, load in loads.items():
            self.orphans[key] = PendingRanges.loaded(load.ids, load.received, load.ranges)
        self._committer = Committer(
            self.store, self._db, self._committed, first_id=await self._db_call(self.store.max_record_id) + 1
        )
        await self.status.start()
        if cfg.metrics is not None:
            try:
                port = self.metrics.serve(cfg.metrics.port, cfg.metrics.address)
            except OSError as exc:
                await self.status.close()
                raise VMReclaimError(
                    f"metrics: cannot listen on {cfg.metrics.address}:{cfg.metrics.port}: "
                    f"{exc.strerror or exc}"
                ) from exc
            event(logging.INFO, "metrics.listening", address=cfg.metrics.address, port=port)
        self._apply_vms(infos, totals)
        for vm, count in rejected.items():
            if vm in self.vms:
                self.vms[vm].rejected = count
        loop = asyncio.get_running_loop()
        if type(self.hypervisor).capabilities.events:
            # Events are hints to list the VMs again now rather than at the next rescan.
            def on_event(ev: VMEvent) -> None:
                event(logging.INFO, "vm.event", vm=ev.vm.name, kind=ev.kind, detail=ev.detail)
                loop.call_soon_threadsafe(self.request_rescan)

            self.hypervisor.watch(on_event)
        self._critical = [
            loop.create_task(self.committer.run(), name="committer"),
            loop.create_task(self._schedule(), name="scheduler"),
            loop.create_task(self._rescan_loop(), name="rescan"),
        ]
        orphaned = {k: p.bytes_upper for k, p in self.orphans.items() if p}
        event(
            logging.INFO,
            "host.ready",
            version=__version__,
            vms=len(self.vms),
            disks=len(self.disks),
            pending_records=sum(rt.pending.records for rt in self.disks.values()),
            orphaned_disks=orphaned,
            database=str(cfg.database),
            status_socket=str(cfg.status_socket),
            policy=cfg.policy.driver,
            hypervisor=cfg.hypervisor.driver,
        )
        self._poke.set()

    async def wait(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set (0) or a part of the daemon fails (1)."""
        stopper = asyncio.get_running_loop().create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *self._critical], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                bug(f"{task.get_name()} failed", exc)
                return 1
        return 0

    async def shutdown(self) -> None:
        """Stop listening, let reclaims in flight finish (within a lease), commit what
        was received, close everything."""
        self._stopping = True
        cfg = self.config
        for task in self._critical[1:]:
            task.cancel()
        running = [t for t in self._tasks if t.get_name().startswith("reclaim:")]
        if running:
            _, late = await asyncio.wait(running, timeout=cfg.fence.lease_seconds + 2)
            for task in late:
                task.cancel()
        for vmrt in self.vms.values():
            if vmrt.listener is not None:
                vmrt.listener.cancel()
        for vmrt in list(self.vms.values()):
            if vmrt.session is not None:
                await vmrt.session.close("host daemon stopping")
        if self._committer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.committer.drain(), 30)
        for task in [*self._critical, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._critical, *self._tasks, return_exceptions=True)
        await self.status.close()
        self.metrics.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self._db_call(self.store.save_policy, cfg.policy.driver, self.policy.state())
            await self._db_call(self.store.close)
        with contextlib.suppress(Exception):
            self.hypervisor.close()
        self._db.shutdown(wait=True)
        self._work.shutdown(wait=False, cancel_futures=True)
        event(logging.INFO, "host.stopped", rejected_records=self.rejected_total)

    # -- VMs and their channels ------------------------------------------------------------

    def _apply_vms(self, infos: list[VMInfo], totals: dict[str, DiskTotals] | None = None) -> None:
        """Follow the hypervisor's list: new VMs get listeners, gone VMs lose them."""
        seen = set()
        for info in infos:
            name = info.identity.name
            seen.add(name)
            vmrt = self.vms.get(name)
            if vmrt is None:
                vmrt = self.vms[name] = VMRuntime(info)
                event(
                    logging.INFO,
                    "vm.added",
                    vm=name,
                    disks=[d.id for d in info.disks],
                    channel=info.channel.driver if info.channel else None,
                )
            elif vmrt.info.channel != info.channel and vmrt.listener is not None:
                vmrt.listener.cancel()
                vmrt.listener = None
            vmrt.info = info
            for disk in info.disks:
                rt = self.disks.get(disk.key)
                if rt is None:
                    rt = self.disks[disk.key] = DiskRuntime(disk)
                    rt.pending = self.orphans.pop(disk.key, rt.pending)
                    if totals is not None and disk.key in totals:
                        rt.totals = totals[disk.key]
                    self.metrics.pending.labels(name, disk.id).set(rt.pending.bytes_upper)
                rt.disk = disk
            if vmrt.listener is None and info.channel is not None and not self._stopping:
                vmrt.listener = self._spawn(self._listen(name), f"listen:{name}")
            elif info.channel is None:
                event(logging.WARNING, "vm.no_channel", vm=name)
        for name in set(self.vms) - seen:
            vmrt = self.vms.pop(name)
            if vmrt.listener is not None:
                vmrt.listener.cancel()
            if vmrt.session is not None:
                self._spawn(vmrt.session.close("VM removed by the hypervisor"), f"close:{name}")
            for disk in vmrt.info.disks:
                rt = self.disks.pop(disk.key, None)
                if rt is not None and rt.pending:
                    self.orphans[disk.key] = rt.pending
            event(logging.INFO, "vm.removed", vm=name)

    async def _listen(self, name: str) -> None:
        backoff = 1.0
        while not self._stopping:
            vmrt = self.vms.get(name)
            if vmrt is None or vmrt.info.channel is None:
                return
            spec = vmrt.info.channel
            try:
                transport = loader.load_driver("transports", spec.driver, Transport, spec.options)

                async def handler(
                    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
                ) -> None:
                    current = self.vms.get(name)
                    if current is None or self._stopping:
                        writer.close()
                        return
                    try:
                        await AgentSession(self, current.info, reader, writer, peer).run()
                    except Exception as exc:  # a bug in a session must not reach the others
                        bug(f"session of VM {name} failed", exc)

                event(logging.INFO, "channel.listening", vm=name, channel=transport.describe())
                await transport.serve(handler)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a transport that cannot listen now may later
                if not isinstance(exc, VMReclaimError | OSError):
                    bug(f"transport of VM {name} failed", exc)
                event(logging.ERROR, "channel.failed", vm=name, error=str(exc), retry_seconds=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)

    async def _rescan_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan_now.wait(), self.config.reclaim.rescan_seconds)
            self._rescan_now.clear()
            try:
                infos = await self._thread(self.hypervisor.vms)
            except HypervisorError as exc:
                event(logging.WARNING, "hypervisor.unavailable", error=str(exc))
                continue
            self._apply_vms(infos)

    def request_rescan(self) -> None:
        self._rescan_now.set()

    # -- what sessions call ------------------------------------------------------------------

    def attach(self, session: AgentSession) -> None:
        vmrt = self.vms.get(session.name)
        if vmrt is None:
            self._spawn(session.close("VM no longer served"), f"close:{session.name}")
            return
        old = vmrt.session
        vmrt.session = session
        if old is not None and old is not session and not old.closed:
            self._spawn(old.close("replaced by a newer connection"), f"close:{session.name}")
        self.metrics.agents.set(sum(1 for v in self.vms.values() if v.session is not None))
        for disk in vmrt.info.disks:
            self._dirty.add(disk.key)
        self._poke.set()

    def detach(self, session: AgentSession) -> None:
        vmrt = self.vms.get(session.name)
        if vmrt is not None and vmrt.session is session:
            vmrt.session = None
        self.metrics.agents.set(sum(1 for v in self.vms.values() if v.session is not None))

    async def disk_sizes(self, vm: VMInfo) -> dict[str, int]:
        """Virtual sizes of ``vm``'s disks (records are bounded by them)."""

        def size(disk: Disk) -> int:
            with self.reclaimer.open_image(disk) as image:
                return image.virtual_size

        sizes = {}
        for disk in vm.disks:
            try:
                sizes[disk.id] = await self._thread(size, disk)
            except (VMReclaimError, OSError) as exc:
                event(logging.ERROR, "disk.unreadable", disk=disk.key, path=str(disk.path), error=str(exc))
        return sizes

    def admit(self, disk: Disk, record: DeletionRecord) -> str | None:
        """Why a valid record cannot be taken now (a full backlog), or ``None``."""
        rt = self.disks.get(disk.key)
        if rt is None:
            return f"disk {disk.key} is not served"
        if rt.pending.ranges_upper + len(record.ranges) > MAX_PENDING_RANGES:
            return (
                f"disk {disk.key} already has {rt.pending.ranges_upper} pending ranges "
                f"(limit {MAX_PENDING_RANGES}); refused, its blocks stay allocated"
            )
        return None

    def ingest(
        self,
        session: AgentSession,
        disk: Disk,
        record: DeletionRecord,
        done: Callable[[int | None, BaseException | None], None],
    ) -> None:
        self.committer.submit(Incoming(disk.key, record, time.time(), done))

    def _committed(self, batch: list[tuple[Incoming, int]]) -> None:
        """A batch is durable: track its ranges and tell the observers (before the acks)."""
        self.metrics.commits.inc()
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
                self.pipeline.plugins.record_received(vm=VMIdentity(rt.disk.vm), record=rec)
            except Exception as exc:  # an observer's bug must not cost an ack
                bug("a vmreclaim_record_received hook failed", exc)
        # Counters once per disk and batch: a batch may hold thousands of records.
        m = self.metrics
        for key, (records, ranges, size) in per_disk.items():
            rt = self.disks[key]
            rt.totals.received_records += records
            rt.totals.received_bytes += size
            labels = (rt.disk.vm, rt.disk.id)
            m.records.labels(*labels).inc(records)
            m.ranges.labels(*labels).inc(ranges)
            m.deleted_bytes.labels(*labels).inc(size)
            m.pending.labels(*labels).set(rt.pending.bytes_upper)
            self._dirty.add(key)
        self._poke.set()

    def rejected(self, vm: str, reason: str, kind: str) -> None:
        """Count and log a refused message from ``vm``'s channel; tell the observers."""
        self.rejected_total += 1
        self.metrics.rejected.labels(vm, kind).inc()
        if self._committer is not None:
            self.committer.count_rejected(vm)
        vmrt = self.vms.get(vm)
        if vmrt is not None:
            vmrt.rejected += 1
            now = time.monotonic()
            if now - vmrt._log_window > 60:
                vmrt._log_window, vmrt._logged = now, 0
            vmrt._logged += 1
            if vmrt._logged <= REJECT_LOGS_PER_MINUTE:
                event(logging.WARNING, "record.rejected", vm=vm, kind=kind, reason=reason)
            elif vmrt._logged == REJECT_LOGS_PER_MINUTE + 1:
                event(logging.WARNING, "record.rejected_suppressed", vm=vm, for_seconds=60)
        try:
            self.pipeline.plugins.record_rejected(vm=VMIdentity(vm), reason=reason)
        except Exception as exc:
            bug("a vmreclaim_record_rejected hook failed", exc)

    # -- deciding ----------------------------------------------------------------------------

    async def _schedule(self) -> None:
        tick = self.config.reclaim.tick_seconds
        next_tick = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), max(0.0, next_tick - time.monotonic()))
            self._poke.clear()
            mono = time.monotonic()
            if mono >= next_tick:
                keys: set[str] = set(self.disks)
                next_tick = mono + tick
                self._save_policy_soon()
            else:
                keys = self._dirty
            self._dirty = set()
            now = time.time()
            for key in keys:
                rt = self.disks.get(key)
                if rt is not None:
                    self._evaluate(rt, now, mono)
            await asyncio.sleep(DECIDE_COALESCE_SECONDS)

    def _evaluate(self, rt: DiskRuntime, now: float, mono: float) -> None:
        if self._stopping or rt.busy or not rt.pending or mono < rt.retry_at:
            return
        try:
            size = os.stat(rt.disk.path).st_size
            storage = StorageState.of(rt.disk.path)
        except OSError as exc:
            rt.last_decision = Decision(False, f"image {rt.disk.path} cannot be read: {exc.strerror}")
            return
        state = DiskState(
            rt.disk.key, size, rt.pending.bytes_upper, rt.totals.last_reclaim, rt.pending.oldest_received
        )
        try:
            decision = self.pipeline.decide(rt.disk, self.policy, state, storage, now)
        except Exception as exc:  # a policy plugin's bug: no reclaim, and say so
            bug(f"policy {self.config.policy.driver} failed to decide", exc)
            decision = Decision(False, f"policy failed: {exc}")
        rt.last_decision = decision
        if decision.reclaim:
            rt.busy = True
            self._spawn(self._reclaim(rt), f"reclaim:{rt.disk.key}")

    def _save_policy_soon(self) -> None:
        if self._committer is not None and not self._stopping:
            state = self.policy.state()
            if "threshold" in state and isinstance(state["threshold"], int | float):
                self.metrics.threshold.set(state["threshold"])
            if state != self._saved_policy:
                self._saved_policy = state
                self.committer.save_policy((self.config.policy.driver, state))

    # -- reclaiming --------------------------------------------------------------------------

    async def _reclaim(self, rt: DiskRuntime) -> None:
        snap: Snapshot | None = None
        try:
            async with self._slots:
                if self._stopping:
                    return
                snap = rt.pending.snapshot(MAX_RANGES_PER_RECORD)
                if snap is None:
                    return
                started = time.time()
                attempt = await self._attempt(rt, snap)
            # Bookkeeping waits for the database thread, not for a reclaim slot.
            await self._finish(rt, snap, attempt, started)
            snap = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            bug(f"reclaim of {rt.disk.key} failed", exc)
            rt.failures += 1
            rt.retry_at = time.monotonic() + self._backoff(rt.failures)
        finally:
            if snap is not None:
                rt.pending.abandon()
            rt.busy = False
            if rt.pending:
                self._dirty.add(rt.disk.key)
                self._poke.set()

    async def _attempt(self, rt: DiskRuntime, snap: Snapshot) -> Attempt:
        vmrt = self.vms.get(rt.disk.vm)
        if vmrt is None:
            return Attempt("none", POSTPONED, f"VM {rt.disk.vm} is not served")
        try:
            info = await self._thread(self.hypervisor.refresh, vmrt.info.identity)
        except HypervisorError as exc:
            return Attempt("none", POSTPONED, f"hypervisor cannot describe VM {rt.disk.vm}: {exc}")
        if info is None:
            return Attempt("none", POSTPONED, f"VM {rt.disk.vm} no longer exists")
        vmrt.info = info
        disk = info.disk(rt.disk.id)
        if disk is None:
            return Attempt("none", POSTPONED, f"VM {rt.disk.vm} no longer has disk {rt.disk.id}")
        rt.disk = disk
        return await self.reclaimer.attempt(disk, info, vmrt.session, snap)

    def _backoff(self, failures: int) -> float:
        return float(min(self.config.reclaim.retry_max_seconds, 2.0 ** max(0, failures - 1)))

    async def _finish(self, rt: DiskRuntime, snap: Snapshot, attempt: Attempt, started: float) -> None:
        assert self.store is not None
        disk = rt.disk
        finished = time.time()
        row = ReclaimRow(
            disk.key,
            started,
            finished,
            attempt.mode,
            attempt.outcome,
            attempt.requested_bytes,
            attempt.verified_bytes,
            attempt.punched_bytes,
            attempt.freed_bytes,
            attempt.detail[:4000],
        )
        rt.last_attempt, rt.last_attempt_at = attempt, finished
        self.metrics.reclaims.labels(disk.vm, disk.id, attempt.mode, attempt.outcome).inc()
        driver = self.config.policy.driver
        if not attempt.done:
            rt.pending.abandon()
            rt.failures += 1
            rt.retry_at = time.monotonic() + self._backoff(rt.failures)
            self.committer.log_attempt(row)
            level = logging.INFO if attempt.outcome == POSTPONED else logging.WARNING
            event(
                level,
                f"reclaim.{attempt.outcome}",
                disk=disk.key,
                mode=attempt.mode,
                detail=attempt.detail,
                retry_seconds=self._backoff(rt.failures),
            )
            return
        remainder = snap.remainder.union(attempt.keep)
        rid = self.committer.allocate_id() if remainder else None
        try:
            size = os.stat(disk.path).st_size
            storage: StorageState | None = StorageState.of(disk.path)
        except OSError:
            size, storage = 0, None
        if storage is not None:
            after = DiskState(disk.key, size, remainder.total, finished)
            try:
                self.policy.feedback(after, attempt.freed_bytes, storage, finished)
            except Exception as exc:
                bug(f"policy {driver} failed to take feedback", exc)
        stored = StoredRecord(rid, disk.key, 0, snap.oldest_received, remainder) if rid is not None else None
        await self.committer.finish(Finish(row, snap.upto, stored), (driver, self.policy.state()))
        received = rt.pending.consume(snap, rid, remainder)
        t = rt.totals
        t.requested_bytes += attempt.requested_bytes
        t.verified_bytes += attempt.verified_bytes
        t.punched_bytes += attempt.punched_bytes
        t.freed_bytes += attempt.freed_bytes
        t.reclaims += 1
        t.last_reclaim = finished
        m = self.metrics
        m.requested.labels(disk.vm, disk.id).inc(attempt.requested_bytes)
        m.punched.labels(disk.vm, disk.id).inc(attempt.punched_bytes)
        m.freed.labels(disk.vm, disk.id).inc(max(0, attempt.freed_bytes))
        m.last_reclaim.labels(disk.vm, disk.id).set(finished)
        m.pending.labels(disk.vm, disk.id).set(rt.pending.bytes_upper)
        for when in received:
            m.latency.observe(max(0.0, finished - when))
        if attempt.fence_seconds is not None:
            m.fence_seconds.observe(attempt.fence_seconds)
        if attempt.keep:
            rt.failures += 1
            rt.retry_at = time.monotonic() + self._backoff(rt.failures)
        else:
            rt.failures = 0
            rt.retry_at = 0.0
        event(
            logging.INFO,
            "reclaim.done",
            disk=disk.key,
            mode=attempt.mode,
            requested_bytes=attempt.requested_bytes,
            verified_bytes=attempt.verified_bytes,
            punched_bytes=attempt.punched_bytes,
            freed_bytes=attempt.freed_bytes,
            kept_bytes=remainder.total,
            seconds=round(finished - started, 4),
            detail=attempt.detail,
        )

    # -- status ----------------------------------------------------------------------------

    async def status_document(self) -> dict[str, Any]:
        """The ``vmreclaim status --json`` document (DESIGN.md section 8)."""
        if type(self.hypervisor).capabilities.live_state and self.vms:
            # Running state as of now, but a slow hypervisor delays the answer by 2 s at most.
            runtimes = list(self.vms.values())
            asks = [
                asyncio.ensure_future(self._thread(self.hypervisor.refresh, v.info.identity))
                for v in runtimes
            ]
            await asyncio.wait(asks, timeout=2.0)
            for vmrt, ask in zip(runtimes, asks, strict=True):
                if not ask.done():
                    ask.cancel()
                elif not ask.cancelled() and ask.exception() is None:
                    fresh = ask.result()
                    if fresh is not None:
                        vmrt.info = fresh
        policy_state = self.policy.state()
        now, mono = time.time(), time.monotonic()
        vms = []
        for name in sorted(self.vms):
            vmrt = self.vms[name]
            session = vmrt.session
            disks = []
            for d in vmrt.info.disks:
                rt = self.disks.get(d.key)
                if rt is not None:
                    disks.append(self._disk_status(rt, session, policy_state, now, mono))
            vms.append(
                {
                    "name": name,
                    "uuid": vmrt.info.identity.uuid,
                    "running": vmrt.info.running,
                    "agent": session.describe() if session is not None else {"connected": False},
                    "rejected_records": vmrt.rejected,
                    "disks": disks,
                }
            )
        c = self.committer if self._committer is not None else None
        metrics = None
        if self.config.metrics is not None:
            metrics = {"address": self.config.metrics.address, "port": self.metrics.port}
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime_seconds": now - self.started,
            "database": str(self.config.database),
            "hypervisor": self.config.hypervisor.driver,
            "metrics": metrics,
            "vms": vms,
            "policy": {"driver": self.config.policy.driver, **policy_state},
            "rejected_records": self.rejected_total,
            "ingest": {
                "commits": c.commits if c else 0,
                "last_commit_seconds": c.last_commit_seconds if c else None,
            },
            "orphaned": {k: p.bytes_upper for k, p in self.orphans.items() if p},
        }

    def _disk_status(
        self, rt: DiskRuntime, session: AgentSession | None, policy: dict[str, Any], now: float, mono: float
    ) -> dict[str, Any]:
        d, t = rt.disk, rt.totals
        pending = rt.pending.exact()
        attempt = rt.last_attempt
        if rt.busy:
            state = "reclaiming"
        elif not pending:
            state = "idle"
        elif rt.retry_at > mono and attempt is not None:
            state = f"retry in {rt.retry_at - mono:.0f}s: {attempt.outcome}: {attempt.detail}"
        elif rt.last_decision is not None:
            state = f"waiting: {rt.last_decision.reason}"
        else:
            state = "pending"
        try:
            image_size: int | None = os.stat(d.path).st_size
        except OSError:
            image_size = None
        return {
            "id": d.id,
            "path": str(d.path),
            "format": d.format if d.format != "auto" else self.reclaimer.pinned_formats.get(d.path, "auto"),
            "pending_bytes": pending.total,
            "pending_ranges": len(pending),
            "pending_records": rt.pending.records,
            "punched_bytes": t.punched_bytes,
            "freed_bytes": t.freed_bytes,
            "requested_bytes": t.requested_bytes,
            "verified_bytes": t.verified_bytes,
            "received_records": t.received_records,
            "received_bytes": t.received_bytes,
            "reclaims": t.reclaims,
            "last_reclaim": t.last_reclaim,
            "image_size": image_size,
            "threshold": policy.get("threshold"),
            "mode": session.info.modes.get(d.id) if session is not None else None,
            "state": state,
            "last_decision": (
                {"reclaim": rt.last_decision.reclaim, "reason": rt.last_decision.reason}
                if rt.last_decision is not None
                else None
            ),
            "last_attempt": (
                {
                    "at": rt.last_attempt_at,
                    "mode": attempt.mode,
                    "outcome": attempt.outcome,
                    "detail": attempt.detail,
                    "requested_bytes": attempt.requested_bytes,
                    "verified_bytes": attempt.verified_bytes,
                    "punched_bytes": attempt.punched_bytes,
                    "freed_bytes": attempt.freed_bytes,
                }
                if attempt is not None
                else None
            ),
        }


async def _main(config: HostConfig) -> int:
    daemon = HostDaemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.request_rescan)
    try:
        await daemon.start()
        return await daemon.wait(stop)
    finally:
        await daemon.shutdown()


def run_host(config: HostConfig) -> int:
    """``vmreclaim host --config FILE``: run until SIGTERM or SIGINT; SIGHUP re-lists VMs."""
    setup_logging(config.log_level, config.log_format)
    return asyncio.run(_main(config))
