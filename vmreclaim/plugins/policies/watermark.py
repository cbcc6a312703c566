"""Policy ``watermark``: reclaim in batches, and never fence a disk too often.

A disk is reclaimed when its pending bytes reach ``batch_bytes``, or at any size once
the host filesystem is fuller than ``high_watermark`` — but never sooner than
``min_interval_seconds`` after its previous reclaim, because each live reclaim freezes
the guest's filesystem for a moment.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from vmreclaim.core.options import PolicyOptions
from vmreclaim.core.policies import Decision, DiskState, Policy, StorageState


class WatermarkOptions(PolicyOptions):
    batch_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    high_watermark: float = Field(default=0.85, gt=0.0, le=1.0)
    min_interval_seconds: float = Field(default=60.0, ge=0.0)

    @model_validator(mode="after")
    def _interval_within_bound(self) -> WatermarkOptions:
        # The bound on waiting wins over the interval; a longer interval would be a lie.
        if self.max_delay_seconds is not None and self.min_interval_seconds > self.max_delay_seconds:
            raise ValueError(
                f"min_interval_seconds {self.min_interval_seconds:g} is above "
                f"max_delay_seconds {self.max_delay_seconds:g}"
            )
        return self


class WatermarkPolicy(Policy):
    """Batch reclaims by size, hurry above a host usage watermark, rate-limit fences."""

    Options = WatermarkOptions
    options: WatermarkOptions

    def decide(self, disk: DiskState, storage: StorageState, now: float) -> Decision:
        o = self.options
        if disk.pending_bytes <= 0:
            return Decision(False, "nothing pending")
        if disk.last_reclaim is not None and now - disk.last_reclaim < o.min_interval_seconds:
            wait = o.min_interval_seconds - (now - disk.last_reclaim)
            return Decision(False, f"reclaimed {now - disk.last_reclaim:.0f}s ago; next in {wait:.0f}s")
        if storage.used_fraction >= o.high_watermark:
            return Decision(
                True, f"host usage {storage.used_fraction:.3f} above high watermark {o.high_watermark}"
            )
        if disk.pending_bytes >= o.batch_bytes:
            return Decision(True, f"{disk.pending_bytes} pending bytes fill a batch of {o.batch_bytes}")
        return Decision(False, f"{disk.pending_bytes} of {o.batch_bytes} batch bytes pending")
