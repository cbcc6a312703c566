"""From guest ranges to a safe set of host ranges to punch, and the report of a punch.

This is the translate stage's common half, the same for every format (DESIGN.md
section 4, rule 3). The format driver says where guest bytes live and which are
exclusively the guest's (``DATA``); this module then

1. refuses ranges that are empty or outside the virtual disk (``RangeError``, exit 2);
2. refuses the whole request if the driver's answer is inconsistent: two guest ranges
   on the same host bytes, data on top of the format's metadata, data past the end of
   the file (``CorruptImageError``, exit 4) — a wrong map must never lead to a punch;
3. rounds the host ranges inward to whole host-filesystem blocks;
4. accounts for every requested byte: punched, or skipped with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmreclaim.core.errors import CorruptImageError, RangeError
from vmreclaim.core.extents import ExtentKind, ExtentMap
from vmreclaim.core.formats import Image, ImageFile
from vmreclaim.core.ranges import RangeSet, overlapping_pairs

#: Reason given for data bytes that share a host block with bytes we may not punch.
PARTIAL_BLOCK = "partial-block"
#: Reason given for data bytes whose host bytes are already a hole: punching them frees
#: nothing, so they are neither punched nor counted (issue 21: counts that overstate).
HOLE = "hole"


@dataclass(frozen=True)
class Skip:
    """Guest bytes that were asked for but will not be punched, and why."""

    start: int
    length: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "length": self.length, "reason": self.reason}


@dataclass
class ReclaimPlan:
    """What a reclaim will punch, in host bytes of ``image.data_file``, and what not."""

    requested: RangeSet
    #: The ``DATA`` extents of the request: guest ranges and their host offsets.
    data: ExtentMap
    punch: RangeSet
    skipped: list[Skip] = field(default_factory=list)
    block_size: int = 4096

    @property
    def requested_bytes(self) -> int:
        return self.requested.total

    @property
    def punch_bytes(self) -> int:
        return self.punch.total

    @property
    def guest_ranges(self) -> RangeSet:
        """The guest ranges whose host bytes this plan punches: what every other
        reclaim mode (deep discard, a guest trim) may act on, and nothing more."""
        return _guest_pieces(self.data, self.punch)

    def narrowed(self, allowed: RangeSet, reason: str) -> ReclaimPlan:
        """The plan punching only host bytes inside ``allowed``; the guest bytes that
        drop out are skipped with ``reason``."""
        kept = self.punch.intersect(allowed)
        dropped = _guest_pieces(self.data, self.punch.subtract(kept))
        skipped = self.skipped + [Skip(r.start, r.length, reason) for r in dropped]
        skipped.sort(key=lambda s: s.start)
        return ReclaimPlan(self.requested, self.data, kept, skipped, self.block_size)


def only_allocated(plan: ReclaimPlan, file: ImageFile, fd: int) -> ReclaimPlan:
    """``plan`` narrowed to the host bytes its data file ``file`` (open as ``fd``) holds now.

    What is left is what a punch frees: a dry run reports it, ``punched_bytes`` counts
    it, and the host daemon does not raise a fence for a request that keeps nothing.
    ``file`` (the image's data file) answers for storage that is not a local file.
    """
    if not plan.punch:
        return plan
    return plan.narrowed(file.held(fd, plan.punch.bounds), HOLE)


@dataclass(frozen=True)
class ReclaimReport:
    """The outcome of one reclaim; ``to_json`` is the ``image reclaim`` document."""

    requested_bytes: int
    punched_bytes: int
    freed_bytes: int
    skipped: list[Skip]
    dry_run: bool = False
    mode: str = "punch"

    def to_json(self) -> dict[str, Any]:
        return {
            "requested_bytes": self.requested_bytes,
            "punched_bytes": self.punched_bytes,
            "freed_bytes": self.freed_bytes,
            "skipped": [s.to_json() for s in self.skipped],
            "dry_run": self.dry_run,
            "mode": self.mode,
        }


def validate_guest_ranges(ranges: RangeSet, virtual_size: int, *, what: str = "range") -> None:
    """Refuse an empty request or a range beyond the virtual disk, naming it."""
    if not ranges:
        raise RangeError(f"no {what}s to reclaim: give at least one non-empty range")
    if int(ranges.ends[-1]) > virtual_size:
        bad = next(r for r in ranges if r.end > virtual_size)
        raise RangeError(f"{what} {bad} lies outside the virtual disk ({virtual_size} bytes)")


def plan_reclaim(image: Image, ranges: RangeSet, block_size: int) -> ReclaimPlan:
    """Translate guest ``ranges`` of ``image`` into host ranges that are safe to punch."""
    validate_guest_ranges(ranges, image.virtual_size)
    where = f"{image.file.path}"
    extents = image.map(ranges.bounds).restrict(ranges)
    if int(extents.lengths.sum()) != ranges.total:
        raise CorruptImageError(f"{where}: the {image.format_name} map does not cover the request")

    data = extents.select(ExtentKind.DATA)
    host = data.host_ranges()
    if host.total != int(data.lengths.sum()):
        raise CorruptImageError(f"{where}: two guest ranges map to the same host bytes; refusing to punch")
    clash = host.intersect(image.metadata_ranges())
    if clash:
        first = next(iter(clash))
        raise CorruptImageError(
            f"{where}: guest data maps onto {image.format_name} metadata at host {first}; refusing to punch"
        )
    file_size = image.data_file.size
    if host and int(host.ends[-1]) > file_size:
        raise CorruptImageError(
            f"{where}: guest data maps past the end of {image.data_file.path} "
            f"(host {int(host.ends[-1]):#x} > size {file_size:#x})"
        )

    punch = image.data_file.punchable(host, block_size)
    punched_guest = _guest_pieces(data, punch)
    skipped = _skips(extents.select(*[k for k in ExtentKind if k is not ExtentKind.DATA]))
    lost = data.guest_ranges().subtract(punched_guest)
    skipped += [Skip(r.start, r.length, PARTIAL_BLOCK) for r in lost]
    skipped.sort(key=lambda s: s.start)
    return ReclaimPlan(ranges, data, punch, skipped, block_size)


def _guest_pieces(data: ExtentMap, host: RangeSet) -> RangeSet:
    """Guest ranges of ``data`` extents whose host bytes lie inside ``host``."""
    if not len(data) or not host:
        return RangeSet()
    order = np.argsort(data.offsets, kind="stable")
    offs = data.offsets[order]
    ends = offs + data.lengths[order]
    ai, bi = overlapping_pairs(offs, ends, host.starts, host.ends)
    lo = np.maximum(offs[ai], host.starts[bi])
    hi = np.minimum(ends[ai], host.ends[bi])
    guest_lo = data.starts[order][ai] + (lo - offs[ai])
    return RangeSet(guest_lo, guest_lo + (hi - lo))


def _skips(extents: ExtentMap) -> list[Skip]:
    merged = ExtentMap(
        extents.starts, extents.lengths, extents.kinds, np.full(len(extents), -1, dtype=np.int64)
    ).merged()
    return [Skip(e.start, e.length, e.kind.label) for e in merged]
