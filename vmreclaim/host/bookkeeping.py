"""Reclaim bookkeeping: what happens after an attempt, whatever its outcome.

A failed or postponed attempt gives its snapshot back to the pending ranges, is logged
in the database and makes the disk wait (1 s, 2 s, 4 s ... up to
``reclaim.retry_max_seconds``). A done attempt is stored in one transaction with the
records it handled removed and what stays pending (ranges that could not be verified)
written back as one new record; then the disk's totals, the metrics and the policy's
feedback (the freed bytes and the host storage state) follow. The policy's state is
saved here too, whenever it changed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vmreclaim.core.errors import VMReclaimError
from vmreclaim.core.opening import image_size, storage_state
from vmreclaim.core.policies import DiskState, Policy, StorageState
from vmreclaim.host.attempt import POSTPONED, Attempt
from vmreclaim.host.disks import DiskRuntime
from vmreclaim.host.ingest import Committer
from vmreclaim.host.logs import bug, event
from vmreclaim.host.metrics import HostMetrics
from vmreclaim.host.pending import Snapshot
from vmreclaim.host.store import Finish, ReclaimRow, StoredRecord


class ReclaimBook:
    """Records attempts' outcomes in the database, the disk's state, metrics and policy."""

    def __init__(
        self,
        committer: Committer,
        policy: Policy,
        policy_driver: str,
        metrics: HostMetrics,
        *,
        retry_max_seconds: float,
    ) -> None:
        self._committer = committer
        self._policy = policy
        self._driver = policy_driver
        self._metrics = metrics
        self._retry_max = retry_max_seconds
        self._saved_policy: dict[str, Any] | None = None

    def save_policy_soon(self) -> None:
        """Queue the policy's state for the next commit if it changed since the last one."""
        state = self._policy.state()
        if "threshold" in state and isinstance(state["threshold"], int | float):
            self._metrics.threshold.set(state["threshold"])
        if state != self._saved_policy:
            self._saved_policy = state
            self._committer.save_policy((self._driver, state))

    async def finish(self, rt: DiskRuntime, snap: Snapshot, attempt: Attempt, started: float) -> None:
        """Account for ``attempt`` on ``rt``'s snapshot ``snap`` (see the module docstring)."""
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
        self._metrics.reclaims.labels(disk.vm, disk.id, attempt.mode, attempt.outcome).inc()
        if not attempt.done:
            rt.pending.abandon()
            wait = rt.back_off(self._retry_max)
            self._committer.log_attempt(row)
            level = logging.INFO if attempt.outcome == POSTPONED else logging.WARNING
            event(
                level,
                f"reclaim.{attempt.outcome}",
                disk=disk.key,
                mode=attempt.mode,
                detail=attempt.detail,
                retry_seconds=wait,
            )
            return
        remainder = snap.remainder.union(attempt.still_pending)
        rid = self._committer.allocate_id() if remainder else None
        try:
            size = image_size(disk.path)
            storage: StorageState | None = storage_state(disk.path)
        except (OSError, VMReclaimError):
            size, storage = 0, None
        if storage is not None:
            after = DiskState(disk.key, size, remainder.total, finished)
            try:
                self._policy.feedback(after, attempt.freed_bytes, storage, finished)
            except Exception as exc:
                bug(f"policy {self._driver} failed to take feedback", exc)
        stored = StoredRecord(rid, disk.key, 0, snap.oldest_received, remainder) if rid is not None else None
        await self._committer.finish(Finish(row, snap.upto, stored), (self._driver, self._policy.state()))
        received = rt.pending.consume(snap, rid, remainder)
        t = rt.totals
        t.requested_bytes += attempt.requested_bytes
        t.verified_bytes += attempt.verified_bytes
        t.punched_bytes += attempt.punched_bytes
        t.freed_bytes += attempt.freed_bytes
        t.reclaims += 1
        t.last_reclaim = finished
        m = self._metrics
        m.requested.labels(disk.vm, disk.id).inc(attempt.requested_bytes)
        m.punched.labels(disk.vm, disk.id).inc(attempt.punched_bytes)
        m.freed.labels(disk.vm, disk.id).inc(max(0, attempt.freed_bytes))
        m.last_reclaim.labels(disk.vm, disk.id).set(finished)
        m.pending.labels(disk.vm, disk.id).set(rt.pending.bytes_upper)
        for when in received:
            m.latency.observe(max(0.0, finished - when))
        if attempt.fence_seconds is not None:
            m.fence_seconds.observe(attempt.fence_seconds)
        if attempt.still_pending:
            rt.back_off(self._retry_max)
        else:
            rt.succeeded()
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
