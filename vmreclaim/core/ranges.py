"""Byte ranges and coalescing range sets.

A :class:`ByteRange` is one half-open interval ``[start, end)`` of bytes. A
:class:`RangeSet` is any number of them, kept sorted, disjoint and coalesced in two
``int64`` numpy arrays, because a deletion record or a sparsify pass can carry hundreds
of thousands of ranges and the hot paths (translate, align, punch) must not build one
Python object per range.

Every operation returns a new object; both types are immutable.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import RangeError

Int64Array = npt.NDArray[np.int64]

#: The largest byte offset a range may reach: offsets are ``int64`` everywhere (files,
#: ``lseek``, ``fallocate``), so anything above cannot name a real byte.
MAX_OFFSET = 2**63 - 1


@dataclass(frozen=True, slots=True, order=True)
class ByteRange:
    """The bytes ``[start, start + length)``; ``length`` may be 0 (an empty range)."""

    start: int
    length: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.length < 0 or self.start + self.length > MAX_OFFSET:
            raise RangeError(
                f"byte range start={self.start} length={self.length} is negative or overflows 2**63-1"
            )

    @classmethod
    def from_bounds(cls, start: int, end: int) -> ByteRange:
        if end < start:
            raise RangeError(f"byte range end {end} lies before its start {start}")
        return cls(start, end - start)

    @property
    def end(self) -> int:
        return self.start + self.length

    def __bool__(self) -> bool:
        return self.length > 0

    def overlaps(self, other: ByteRange) -> bool:
        return self.start < other.end and other.start < self.end

    def touches(self, other: ByteRange) -> bool:
        """True when the two ranges overlap or are adjacent (they merge into one)."""
        return self.start <= other.end and other.start <= self.end

    def merge(self, other: ByteRange) -> ByteRange:
        if not self.touches(other):
            raise RangeError(f"{self} and {other} neither overlap nor touch")
        return ByteRange.from_bounds(min(self.start, other.start), max(self.end, other.end))

    def intersect(self, other: ByteRange) -> ByteRange:
        """The common bytes; an empty range at ``max(start)`` when there are none."""
        start = max(self.start, other.start)
        return ByteRange(start, max(0, min(self.end, other.end) - start))

    def subtract(self, other: ByteRange) -> tuple[ByteRange, ...]:
        """What is left of this range once ``other`` is removed: zero, one or two ranges."""
        if not self.overlaps(other):
            return (self,) if self else ()
        left = ByteRange.from_bounds(self.start, other.start) if other.start > self.start else None
        right = ByteRange.from_bounds(other.end, self.end) if other.end < self.end else None
        return tuple(r for r in (left, right) if r)

    def align_inward(self, alignment: int) -> ByteRange:
        """The largest sub-range whose bounds are multiples of ``alignment``.

        Punching works on whole host-filesystem blocks: rounding inward makes sure no
        byte outside the asked range is ever freed.
        """
        if alignment <= 0:
            raise RangeError(f"alignment must be positive, got {alignment}")
        start = -(-self.start // alignment) * alignment
        end = (self.end // alignment) * alignment
        return ByteRange(start, end - start) if end > start else ByteRange(start, 0)

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


class RangeSet:
    """A sorted, disjoint, coalesced set of byte ranges backed by numpy arrays.

    Adjacent and overlapping inputs merge: ``{[0,4), [4,8)}`` is the single ``[0,8)``.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self, starts: Any = (), ends: Any = (), *, _normalised: bool = False) -> None:
        s = np.asarray(starts, dtype=np.int64).reshape(-1)
        e = np.asarray(ends, dtype=np.int64).reshape(-1)
        if s.shape != e.shape:
            raise RangeError(f"{s.size} range starts but {e.size} range ends")
        if not _normalised:
            s, e = _normalise(s, e)
        s.flags.writeable = False
        e.flags.writeable = False
        self._starts: Int64Array = s
        self._ends: Int64Array = e

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_ranges(cls, ranges: Iterable[ByteRange | tuple[int, int]]) -> RangeSet:
        """Build from ``ByteRange`` objects or ``(start, length)`` pairs."""
        # ByteRange() validates sign and overflow with a clear message.
        checked = [r if isinstance(r, ByteRange) else ByteRange(*r) for r in ranges]
        s = np.fromiter((r.start for r in checked), dtype=np.int64, count=len(checked))
        e = np.fromiter((r.end for r in checked), dtype=np.int64, count=len(checked))
        return cls(s, e)

    @classmethod
    def from_arrays(cls, starts: Int64Array, lengths: Int64Array) -> RangeSet:
        """Build from parallel ``int64`` arrays of starts and lengths (validated)."""
        s = np.asarray(starts, dtype=np.int64)
        n = np.asarray(lengths, dtype=np.int64)
        if s.size and (int(s.min()) < 0 or int(n.min()) < 0):
            raise RangeError("range starts and lengths must not be negative")
        if s.size and int((MAX_OFFSET - s - n).min()) < 0:
            raise RangeError("a range overflows 2**63-1")
        return cls(s, s + n)

    # -- inspection --------------------------------------------------------------------

    @property
    def starts(self) -> Int64Array:
        return self._starts

    @property
    def ends(self) -> Int64Array:
        return self._ends

    @property
    def lengths(self) -> Int64Array:
        return self._ends - self._starts

    @property
    def total(self) -> int:
        """Bytes covered by the set."""
        return int((self._ends - self._starts).sum())

    @property
    def bounds(self) -> ByteRange:
        """The smallest single range covering the whole set (empty for an empty set)."""
        if not len(self):
            return ByteRange(0, 0)
        return ByteRange.from_bounds(int(self._starts[0]), int(self._ends[-1]))

    def __len__(self) -> int:
        return int(self._starts.size)

    def __bool__(self) -> bool:
        return bool(self._starts.size)

    def __iter__(self) -> Iterator[ByteRange]:
        for s, e in zip(self._starts.tolist(), self._ends.tolist(), strict=True):
            yield ByteRange(s, e - s)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return np.array_equal(self._starts, other._starts) and np.array_equal(self._ends, other._ends)

    def __hash__(self) -> int:
        return hash((self._starts.tobytes(), self._ends.tobytes()))

    def __repr__(self) -> str:
        shown = ", ".join(str(r) for r, _ in zip(self, range(4), strict=False))
        more = f", ... {len(self) - 4} more" if len(self) > 4 else ""
        return f"RangeSet({shown}{more})"

    def to_pairs(self) -> list[list[int]]:
        """``[[start, length], ...]``: the JSON shape of DESIGN.md section 5."""
        return [[s, e - s] for s, e in zip(self._starts.tolist(), self._ends.tolist(), strict=True)]

    def contains(self, other: RangeSet) -> bool:
        """True when every byte of ``other`` is in this set."""
        return not other.subtract(self)

    # -- algebra -----------------------------------------------------------------------

    def union(self, other: RangeSet) -> RangeSet:
        return RangeSet(
            np.concatenate([self._starts, other._starts]),
            np.concatenate([self._ends, other._ends]),
        )

    __or__ = union

    def intersect(self, other: RangeSet | ByteRange) -> RangeSet:
        if isinstance(other, ByteRange):
            return self.clip(other)
        return _intersect(self, other)

    __and__ = intersect

    def subtract(self, other: RangeSet) -> RangeSet:
        if not self or not other:
            return self
        return _intersect(self, other.complement(self.bounds))

    __sub__ = subtract

    def complement(self, within: ByteRange) -> RangeSet:
        """The bytes of ``within`` that are not in this set."""
        clipped = self.clip(within)
        starts = np.concatenate([[within.start], clipped._ends])
        ends = np.concatenate([clipped._starts, [within.end]])
        keep = ends > starts
        return RangeSet(starts[keep], ends[keep], _normalised=True)

    def clip(self, window: ByteRange) -> RangeSet:
        """The part of the set inside ``window``."""
        s = np.maximum(self._starts, window.start)
        e = np.minimum(self._ends, window.end)
        keep = e > s
        return RangeSet(s[keep], e[keep], _normalised=True)

    def shift(self, delta: int) -> RangeSet:
        """Every range moved by ``delta`` bytes (a partition start, a device offset)."""
        if len(self) and int(self._starts[0]) + delta < 0:
            raise RangeError(f"shifting by {delta} moves {self.bounds} below 0")
        return RangeSet(self._starts + delta, self._ends + delta, _normalised=True)

    def align_inward(self, alignment: int) -> RangeSet:
        """Each range shrunk to whole multiples of ``alignment`` (empty results dropped)."""
        if alignment <= 0:
            raise RangeError(f"alignment must be positive, got {alignment}")
        a = np.int64(alignment)
        s = -(-self._starts // a) * a
        e = (self._ends // a) * a
        keep = e > s
        return RangeSet(s[keep], e[keep], _normalised=True)

    def chunks(self, max_ranges: int) -> Iterator[RangeSet]:
        """Consecutive sub-sets of at most ``max_ranges`` ranges each."""
        for i in range(0, len(self), max_ranges):
            yield RangeSet(self._starts[i : i + max_ranges], self._ends[i : i + max_ranges], _normalised=True)


def _normalise(starts: Int64Array, ends: Int64Array) -> tuple[Int64Array, Int64Array]:
    """Sort, drop empty ranges and merge overlapping or adjacent ones."""
    if starts.size and bool((ends < starts).any()):
        bad = int(np.argmax(ends < starts))
        raise RangeError(f"range end {int(ends[bad])} lies before its start {int(starts[bad])}")
    keep = ends > starts
    s, e = starts[keep], ends[keep]
    if s.size <= 1:
        return s.copy(), e.copy()
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    # Running maximum of the ends: a range starts a new run when it begins after
    # every earlier range has ended (strictly after: adjacent ranges merge).
    run_end = np.maximum.accumulate(e)
    new_run = np.empty(s.size, dtype=bool)
    new_run[0] = True
    new_run[1:] = s[1:] > run_end[:-1]
    first = np.flatnonzero(new_run)
    last = np.append(first[1:], s.size) - 1
    return s[first], run_end[last]


def overlapping_pairs(
    a_starts: Int64Array, a_ends: Int64Array, b_starts: Int64Array, b_ends: Int64Array
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Index pairs ``(i, j)`` where range ``a[i]`` and range ``b[j]`` overlap.

    Both inputs must be sorted by start and disjoint (a :class:`RangeSet`'s arrays
    are). Vectorised: the cost is the number of pairs, not ``len(a) * len(b)``.
    """
    lo = np.searchsorted(b_ends, a_starts, side="right")
    hi = np.searchsorted(b_starts, a_ends, side="left")
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    if not total:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty
    ai = np.repeat(np.arange(a_starts.size), counts)
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    bi = np.repeat(lo, counts) + within
    return ai, bi


def _intersect(a: RangeSet, b: RangeSet) -> RangeSet:
    ai, bi = overlapping_pairs(a.starts, a.ends, b.starts, b.ends)
    s = np.maximum(a.starts[ai], b.starts[bi])
    e = np.minimum(a.ends[ai], b.ends[bi])
    keep = e > s
    return RangeSet(s[keep], e[keep], _normalised=True)
