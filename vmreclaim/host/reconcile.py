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

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.extents import ExtentKind
from vmreclaim.core.formats import Image
from vmreclaim.core.freespace import FreeSpace, FreeSpaceDecoder, Reconcile
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
    #: Free in the guest ∩ this file's data, as of ``last_at`` (guest bytes).
    reclaimable: RangeSet = field(default_factory=RangeSet)
    reclaimable_bytes: int = 0
    free_bytes: int = 0
    #: Allocated bytes of the image when the last reconciliation was asked.
    allocated_at_last: int | None = None
    last_error: str | None = None
    #: Why the next reconciliation is wanted (``None``: not due yet).
    wanted: str | None = None
    #: Monotonic time of the last request, for the interval timer.
    asked_mono: float | None = None


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


_ids = itertools.count(1)


@dataclass(frozen=True)
class FreeSpaceAnswer:
    """A complete, validated ``free_space`` answer (disk bytes)."""

    disk: str
    free: RangeSet
    partial: bool


@dataclass
class _Open:
    disk: str
    disk_size: int
    future: asyncio.Future[FreeSpaceAnswer]
    decoder: FreeSpaceDecoder | None = None


class FreeSpaceCollector:
    """The reconciliations asked on one agent connection, reassembled chunk by chunk.

    At most one per disk is open (a second ask for the same disk joins the first), and
    each holds at most one decoder, which bounds what a guest can make the host keep
    (:data:`~vmreclaim.core.freespace.MAX_FREE_RANGES` ranges per disk).
    """

    def __init__(self) -> None:
        self._open: dict[int, _Open] = {}

    def ask(self, disk: str, disk_size: int) -> tuple[Reconcile | None, asyncio.Future[FreeSpaceAnswer]]:
        """A ``reconcile`` to send (``None``: one is already open for ``disk``) and the
        future of its answer."""
        for item in self._open.values():
            if item.disk == disk:
                return None, item.future
        rid = next(_ids)
        future: asyncio.Future[FreeSpaceAnswer] = asyncio.get_running_loop().create_future()
        self._open[rid] = _Open(disk, disk_size, future)
        return Reconcile(id=rid, disk=disk), future

    def received(self, msg: FreeSpace) -> str | None:
        """Take one chunk; a refusal to count against the VM, or ``None``.

        A chunk that does not validate fails the whole reconciliation (its other chunks
        are dropped): nothing of a half-valid answer is used.
        """
        item = self._open.get(msg.id)
        if item is None:
            return f"free_space for reconciliation {msg.id}, which this host did not ask (or gave up on)"
        if msg.disk != item.disk:
            return self._fail(msg.id, f"free_space {msg.id} names disk {msg.disk!r}, asked for {item.disk!r}")
        if msg.error is not None:
            return self._fail(
                msg.id, f"the agent could not list the free space of {item.disk!r}: {msg.error}"
            )
        try:
            if msg.chunks == 0:
                if msg.chunk != 0 or msg.ranges or msg.data:
                    raise ProtocolError(f"free space of disk {item.disk!r}: data in an answer of 0 chunks")
                self._done(msg.id, FreeSpaceAnswer(item.disk, RangeSet(), msg.partial))
                return None
            if item.decoder is None:
                item.decoder = FreeSpaceDecoder(disk=item.disk, disk_size=item.disk_size, chunks=msg.chunks)
            elif msg.chunks != item.decoder.expected:
                raise ProtocolError(
                    f"free space of disk {item.disk!r}: chunk {msg.chunk} says {msg.chunks} chunks, "
                    f"the first said {item.decoder.expected}"
                )
            item.decoder.add(msg.chunk, msg.as_chunk())
            if item.decoder.complete:
                self._done(msg.id, FreeSpaceAnswer(item.disk, item.decoder.result(), msg.partial))
        except ProtocolError as exc:
            return self._fail(msg.id, str(exc))
        return None

    def _done(self, rid: int, answer: FreeSpaceAnswer) -> None:
        item = self._open.pop(rid)
        if not item.future.done():
            item.future.set_result(answer)

    def _fail(self, rid: int, why: str) -> str:
        item = self._open.pop(rid)
        if not item.future.done():
            item.future.set_exception(ProtocolError(why))
        return why

    def abandon(self, future: asyncio.Future[FreeSpaceAnswer]) -> None:
        """Forget the request behind ``future`` (timed out): later chunks are refused."""
        for rid, item in list(self._open.items()):
            if item.future is future:
                del self._open[rid]

    def close(self, why: str) -> None:
        for rid in list(self._open):
            item = self._open.pop(rid)
            if not item.future.done():
                item.future.set_exception(ConnectionError(why))
