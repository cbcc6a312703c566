"""Policy driver ``quiet-hours``: reclaim outside busy hours, in batches."""

from __future__ import annotations

import time

from pydantic import Field

from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.policies import Decision, DiskState, Policy, StorageState


class QuietHoursOptions(DriverOptions):
    busy_from: int = Field(default=8, ge=0, le=23)
    busy_until: int = Field(default=18, ge=0, le=24)
    min_pending_bytes: int = Field(default=1 << 20, ge=0)


class QuietHoursPolicy(Policy):
    """Reclaim when ``min_pending_bytes`` are pending, except during busy hours (local time)."""

    Options = QuietHoursOptions
    options: QuietHoursOptions

    def decide(self, disk: DiskState, storage: StorageState, now: float) -> Decision:
        hour = time.localtime(now).tm_hour
        if self.options.busy_from <= hour < self.options.busy_until:
            return Decision(False, f"busy hours ({self.options.busy_from}:00-{self.options.busy_until}:00)")
        if disk.pending_bytes < self.options.min_pending_bytes:
            return Decision(False, f"{disk.pending_bytes} of {self.options.min_pending_bytes} bytes pending")
        return Decision(True, "quiet hours and enough pending")
