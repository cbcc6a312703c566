"""What the daemon does for its agent sessions: the :class:`~vmreclaim.host.session.SessionHost`.

A session validates each line itself; it then asks the :class:`Intake` for the disks'
sizes (at ``hello``), whether a record fits the disk's backlog, and to store it durably
(the committer acknowledges it through the session once committed). Refused messages
are counted per VM and in total, logged (at most ``REJECT_LOGS_PER_MINUTE`` per VM) and
shown to the observers through the pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from vmreclaim.core.errors import VMReclaimError
from vmreclaim.core.hypervisors import VMInfo
from vmreclaim.core.model import DeletionRecord, Disk, VMIdentity
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.host.images import ImageOpener
from vmreclaim.host.ingest import Committer, Incoming
from vmreclaim.host.logs import bug, event
from vmreclaim.host.metrics import HostMetrics
from vmreclaim.host.registry import VMRegistry
from vmreclaim.host.scheduler import Scheduler
from vmreclaim.host.session import AgentSession


class Intake:
    """The daemon's side of every session; see the module docstring."""

    def __init__(
        self,
        registry: VMRegistry,
        scheduler: Scheduler,
        committer: Committer,
        images: ImageOpener,
        pipeline: Pipeline,
        metrics: HostMetrics,
        executor: Executor,
        *,
        rejected_total: int = 0,
    ) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._committer = committer
        self._images = images
        self._pipeline = pipeline
        self._metrics = metrics
        self._executor = executor
        self.rejected_total = rejected_total

    async def disk_sizes(self, vm: VMInfo) -> dict[str, int]:
        """Virtual sizes of ``vm``'s disks (records are bounded by them)."""

        def size(disk: Disk) -> int:
            with self._images.open(disk) as image:
                return image.virtual_size

        loop = asyncio.get_running_loop()
        sizes = {}
        for disk in vm.disks:
            try:
                sizes[disk.id] = await loop.run_in_executor(self._executor, size, disk)
            except (VMReclaimError, OSError) as exc:
                event(logging.ERROR, "disk.unreadable", disk=disk.key, path=str(disk.path), error=str(exc))
        return sizes

    def attach(self, session: AgentSession) -> None:
        self._registry.attach(session)

    def detach(self, session: AgentSession) -> None:
        self._registry.detach(session)

    def rejected(self, vm: str, reason: str, kind: str) -> None:
        """Count and log a refused message from ``vm``'s channel; tell the observers."""
        self.rejected_total += 1
        self._metrics.rejected.labels(vm, kind).inc()
        self._committer.count_rejected(vm)
        if self._registry.count_rejected(vm):
            event(logging.WARNING, "record.rejected", vm=vm, kind=kind, reason=reason)
        try:
            self._pipeline.record_rejected(VMIdentity(vm), reason)
        except Exception as exc:
            bug("a vmreclaim_record_rejected hook failed", exc)

    def admit(self, disk: Disk, record: DeletionRecord) -> str | None:
        return self._scheduler.admit(disk, record)

    def ingest(
        self, disk: Disk, record: DeletionRecord, done: Callable[[int | None, BaseException | None], None]
    ) -> None:
        rt = self._scheduler.disks.get(disk.key)
        if rt is not None and rt.pending.covers(record.ranges):
            # A resend of ranges already durable and pending: acknowledged, not stored
            # again (2,000,000 resends of one range must not grow the database).
            asyncio.get_running_loop().call_soon(done, 0, None)
            return
        self._committer.submit(Incoming(disk.key, record, time.time(), done))

    async def room(self) -> None:
        await self._committer.room()
