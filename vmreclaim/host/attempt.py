"""The outcome of one reclaim attempt, as the reclaimer reports it and the daemon keeps it."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmreclaim.core.ranges import RangeSet

DONE = "done"
#: Not now, for a reason that is not an error (a block job, a busy image, no agent).
POSTPONED = "postponed"
REFUSED = "refused"
EXPIRED = "expired"
FAILED = "failed"


@dataclass
class Attempt:
    """The outcome of one reclaim attempt of one disk."""

    mode: str
    outcome: str
    detail: str = ""
    requested_bytes: int = 0
    verified_bytes: int = 0
    punched_bytes: int = 0
    freed_bytes: int = 0
    #: Seconds the guest filesystem was frozen (fence mode), from request to release.
    fence_seconds: float | None = None
    #: Ranges of the snapshot that stay pending although the attempt is done.
    still_pending: RangeSet = field(default_factory=RangeSet)

    @property
    def done(self) -> bool:
        return self.outcome == DONE
