"""What the daemon knows about one served disk between reclaims.

A :class:`DiskRuntime` is created by the scheduler (:mod:`vmreclaim.host.scheduler`)
when the VM registry reports a disk, read by the status document, and updated after
each attempt by the bookkeeping (:mod:`vmreclaim.host.bookkeeping`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vmreclaim.core.model import Disk
from vmreclaim.core.policies import Decision
from vmreclaim.host.attempt import Attempt
from vmreclaim.host.pending import PendingRanges
from vmreclaim.host.store import DiskTotals


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
    #: The operator asked to reclaim now (``vmreclaim reclaim``): the policy is not asked
    #: until nothing is pending.
    forced: bool = False

    def back_off(self, retry_max_seconds: float) -> float:
        """Count a failure and wait before the next try (doubling, capped); the wait."""
        self.failures += 1
        wait = backoff_seconds(self.failures, retry_max_seconds)
        self.retry_at = time.monotonic() + wait
        return wait

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = 0.0


def backoff_seconds(failures: int, retry_max_seconds: float) -> float:
    """1, 2, 4, ... seconds after consecutive failures, at most ``retry_max_seconds``."""
    return float(min(retry_max_seconds, 2.0 ** max(0, failures - 1)))
