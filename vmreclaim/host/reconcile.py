"""Reconciliation, the host's half: what the guest holds free ∩ what the image holds.

The agent reports the whole free space of a disk (:mod:`vmreclaim.core.freespace`,
validated as untrusted input on the way in). The image's format driver says which guest
ranges this file stores as its own data (``ExtentKind.DATA``: never metadata, shared,
compressed or backing bytes). Their intersection is reclaimable whatever any capture
saw. It becomes ordinary deletion records (``fs: "reconcile"``), so it is stored, decided
by policy, re-verified under the fence (or trimmed, or checked offline) and punched
exactly like the records the captures send — no second punch path.

:class:`ReconcileClock` decides when a disk is due (issue 13): after the agent
(re)connects, when the image's allocated bytes grew by more than ``growth_bytes`` since
the last reconciliation (the host sees the file grow), every ``interval_seconds``, and on
the operator's request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vmreclaim.core.extents import ExtentKind
from vmreclaim.core.formats import Image
from vmreclaim.core.model import DeletionRecord
from vmreclaim.core.ranges import ByteRange, RangeSet

#: Ranges per record made from a reconciliation (what agents send per record too).
RECORD_RANGES = 16_384
RECONCILE_FS = "reconcile"


@dataclass(frozen=True)
class Reconciled:
    """The outcome of one intersection, in guest (virtual-disk) bytes."""

    reclaimable: RangeSet
    free_bytes: int
    allocated_bytes: int
    virtual_bytes: int
    seconds: float


def intersect(image: Image, free: RangeSet) -> Reconciled:
    """``free`` (from the agent, already validated and inside the disk) ∩ the image's data."""
    started = time.monotonic()
    size = image.virtual_size
    extents = image.map(ByteRange(0, size))
    data = extents.select(ExtentKind.DATA).guest_ranges()
    reclaimable = free.clip(ByteRange(0, size)).intersect(data)
    return Reconciled(
        reclaimable=reclaimable,
        free_bytes=free.total,
        allocated_bytes=image.allocated_bytes(),
        virtual_bytes=size,
        seconds=time.monotonic() - started,
    )


def as_records(vm: str, disk: str, ranges: RangeSet) -> list[DeletionRecord]:
    """``ranges`` as deletion records of at most :data:`RECORD_RANGES` ranges each."""
    return [
        DeletionRecord(vm=vm, disk=disk, ranges=part, fs=RECONCILE_FS)
        for part in ranges.chunks(RECORD_RANGES)
    ]


@dataclass
class DiskReconcile:
    """What the host knows of one disk's reconciliations (for ``report``)."""

    #: Wall time of the last completed reconciliation, and its result.
    last_at: float | None = None
    reclaimable_bytes: int = 0
    free_bytes: int = 0
    #: Allocated bytes of the image when the last reconciliation was asked.
    allocated_at_last: int | None = None
    last_error: str | None = None
    #: Why the next reconciliation is wanted (``None``: not due yet).
    wanted: str | None = None
    #: Monotonic time of the last request, for the interval timer.
    asked_mono: float | None = None
    waiters: list[object] = field(default_factory=list)


@dataclass(frozen=True)
class ReconcileClock:
    """When a disk is due for reconciliation (see the module docstring)."""

    interval_seconds: float
    growth_bytes: int
    #: No disk is reconciled more often than this, whatever the trigger (the operator's
    #: request excepted): a guest that grows its image fast costs one reconciliation a
    #: minute, not one per scheduler pass.
    min_gap_seconds: float

    def due(self, state: DiskReconcile, *, allocated: int | None, now_mono: float) -> str | None:
        """Why ``state``'s disk should be reconciled now, or ``None``."""
        if state.wanted == "operator":
            return "operator"
        if state.asked_mono is not None and now_mono - state.asked_mono < self.min_gap_seconds:
            return None
        if state.wanted is not None:
            return state.wanted
        if state.asked_mono is None:
            return "connect"
        if now_mono - state.asked_mono >= self.interval_seconds:
            return "timer"
        if (
            allocated is not None
            and state.allocated_at_last is not None
            and allocated - state.allocated_at_last > self.growth_bytes
        ):
            return "growth"
        return None
