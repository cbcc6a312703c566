"""The daemon's side of reconciliation and of the operator's control requests.

:class:`DaemonSite` is the :class:`~vmreclaim.host.reconcile_jobs.ReconcileSite` the
reconciliations talk to: it answers from the registry (VMs, agents), the scheduler
(pending ranges, totals, the operator's "now"), the committer (records stored durably)
and the image opener (pinned formats). :class:`Operator` serves the control socket
(:mod:`vmreclaim.host.control`): ``reclaim`` and ``report``, and keeps the report's
Prometheus gauges.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import Executor
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from vmreclaim.core.errors import UsageError, VMReclaimError
from vmreclaim.core.extents import ExtentKind
from vmreclaim.core.model import DeletionRecord, Disk
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.host.attempt import DONE
from vmreclaim.host.control import ReclaimRequest, ReportRequest
from vmreclaim.host.images import ImageOpener
from vmreclaim.host.ingest import Committer, Incoming
from vmreclaim.host.reconcile import DiskReconcile, Reconciled, intersect
from vmreclaim.host.reconcile_jobs import DiskProgress, ReconcileSession, Reconciliations
from vmreclaim.host.registry import VMRegistry
from vmreclaim.host.scheduler import Scheduler


class DaemonSite:
    """What reconciliation asks of the daemon (see the module docstring)."""

    def __init__(
        self,
        registry: VMRegistry,
        scheduler: Scheduler,
        committer: Committer,
        images: ImageOpener,
        executor: Executor,
    ) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._committer = committer
        self._images = images
        self._executor = executor

    def session_of(self, vm: str) -> ReconcileSession | None:
        return self._registry.agent(vm)

    def disks_of(self, vm: str) -> list[Disk] | None:
        vmrt = self._registry.vms.get(vm)
        return list(vmrt.info.disks) if vmrt is not None else None

    async def intersect(self, disk: Disk, free: RangeSet) -> Reconciled:
        def work() -> Reconciled:
            with self._images.open(disk) as image:
                return intersect(image, free)

        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def submit(self, disk: Disk, record: DeletionRecord) -> None:
        refusal = self._scheduler.admit(disk, record)
        if refusal is not None:
            raise VMReclaimError(refusal)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def done(_rid: int | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        self._committer.submit(Incoming(disk.key, record, time.time(), done))
        await future

    def force(self, disk: Disk) -> None:
        self._scheduler.force(disk.key)

    def progress(self, disk: Disk) -> DiskProgress:
        rt = self._scheduler.disks.get(disk.key)
        session = self._registry.agent(disk.vm)
        vmrt = self._registry.vms.get(disk.vm)
        if session is not None and session.live:
            mode = session.mode_of(disk.id)
        elif vmrt is not None and not vmrt.info.running:
            mode = "offline"
        else:
            mode = None
        if rt is None:
            return DiskProgress(RangeSet(), False, 0, 0, mode, f"disk {disk.key} is not served")
        waiting = None
        pending = rt.pending.exact()
        if pending and not rt.busy:
            attempt = rt.last_attempt
            if attempt is not None and attempt.outcome != DONE and rt.retry_at > time.monotonic():
                waiting = f"{attempt.outcome}: {attempt.detail}"
            elif rt.last_decision is not None and not rt.last_decision.reclaim:
                waiting = rt.last_decision.reason
        return DiskProgress(pending, rt.busy, rt.totals.punched_bytes, rt.totals.freed_bytes, mode, waiting)


class Operator:
    """Serves control requests; keeps the report gauges."""

    def __init__(
        self,
        reconciliations: Reconciliations,
        site: DaemonSite,
        registry: VMRegistry,
        images: ImageOpener,
        executor: Executor,
        metrics: CollectorRegistry,
    ) -> None:
        self._jobs = reconciliations
        self._site = site
        self._registry = registry
        self._images = images
        self._executor = executor
        reconciliations.on_reconciled = self.reconciled
        disk = ("vm", "disk")
        self.virtual = Gauge("vmreclaim_virtual_bytes", "Virtual size of the disk", disk, registry=metrics)
        self.allocated = Gauge(
            "vmreclaim_allocated_bytes", "Bytes the image file holds on the host", disk, registry=metrics
        )
        self.reclaimable = Gauge(
            "vmreclaim_reclaimable_bytes",
            "Free in the guest and stored in the image, as of the last reconciliation",
            disk,
            registry=metrics,
        )
        self.as_of = Gauge(
            "vmreclaim_reclaimable_timestamp_seconds",
            "Unix time of the last reconciliation",
            disk,
            registry=metrics,
        )

    def reconciled(self, disk: Disk, state: DiskReconcile) -> None:
        labels = (disk.vm, disk.id)
        self.reclaimable.labels(*labels).set(state.reclaimable_bytes)
        if state.last_at is not None:
            self.as_of.labels(*labels).set(state.last_at)

    async def handle(self, request: Any) -> dict[str, Any]:
        if isinstance(request, ReclaimRequest):
            return await self._jobs.operator(
                request.vm, request.disk, dry_run=request.dry_run, wait=request.wait
            )
        if isinstance(request, ReportRequest):
            return await self.report()
        raise UsageError(f"unknown control request {request!r}")

    def _image_facts(self, disk: Disk) -> tuple[int | None, int | None, RangeSet | None]:
        try:
            with self._images.open(disk) as image:
                size = image.virtual_size
                data = image.map(ByteRange(0, size)).select(ExtentKind.DATA).guest_ranges()
                return size, image.allocated_bytes(), data
        except (VMReclaimError, OSError):
            try:
                return None, os.stat(disk.path).st_blocks * 512, None
            except OSError:
                return None, None, None

    async def report(self) -> dict[str, Any]:
        """The ``vmreclaim report`` document (DESIGN.md section 8); updates the gauges."""
        loop = asyncio.get_running_loop()
        vms = []
        for name in sorted(self._registry.vms):
            disks = []
            for disk in self._registry.vms[name].info.disks:
                virtual, allocated, data = await loop.run_in_executor(self._executor, self._image_facts, disk)
                entry = self._jobs.report(disk, virtual, allocated, data)
                disks.append(entry)
                self.update(disk, entry)
            vms.append({"name": name, "disks": disks})
        return {"vms": vms}

    def update(self, disk: Disk, entry: dict[str, Any]) -> None:
        labels = (disk.vm, disk.id)
        for gauge, key in (
            (self.virtual, "virtual_bytes"),
            (self.allocated, "allocated_bytes"),
            (self.reclaimable, "reclaimable_bytes"),
            (self.as_of, "reclaimable_as_of"),
        ):
            if entry.get(key) is not None:
                gauge.labels(*labels).set(entry[key])
