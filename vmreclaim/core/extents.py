"""Extent maps: where each guest byte of a virtual disk lives in the image file.

An :class:`ExtentMap` is the answer of a format driver's ``map``: consecutive guest
ranges, each with a :class:`ExtentKind` and, where the bytes are stored, the host byte
offset inside the image's data file. It is held as four parallel numpy arrays so that a
64 GiB qcow2 with hundreds of thousands of clusters maps without one Python object per
cluster. The JSON shape is the ``image map`` contract of DESIGN.md section 8.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import CorruptImageError
from vmreclaim.core.ranges import ByteRange, Int64Array, RangeSet, overlapping_pairs

#: The host offset of an extent that has none (compressed, unallocated, plain zero).
NO_OFFSET = -1


class ExtentKind(enum.IntEnum):
    """What backs a guest range; the names are the ``kind`` strings of ``image map``."""

    DATA = 0  #: stored in this file at ``offset``, exclusively the guest's: safe to punch
    SHARED = 1  #: stored at ``offset`` but shared (qcow2 refcount > 1): never punched
    COMPRESSED = 2  #: stored compressed, maybe packed with others: never punched
    ZERO = 3  #: reads as zeros; nothing to free (an offset may sit behind the flag)
    UNALLOCATED = 4  #: not stored in this file: zeros, or the backing file's bytes

    @property
    def label(self) -> str:
        return self.name.lower()


_KIND_LABELS = [k.label for k in ExtentKind]


@dataclass(frozen=True)
class Extent:
    """One row of an :class:`ExtentMap`, for callers that want objects (tests, JSON)."""

    start: int
    length: int
    kind: ExtentKind
    offset: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "length": self.length,
            "kind": self.kind.label,
            "offset": self.offset,
        }


class ExtentMap:
    """Guest ranges in order, each with a kind and a host offset (``NO_OFFSET`` if none).

    The constructor takes the arrays as they are; drivers build maps cluster by
    cluster in numpy and call :meth:`merged` once at the end.
    """

    __slots__ = ("starts", "lengths", "kinds", "offsets")

    def __init__(
        self,
        starts: Int64Array,
        lengths: Int64Array,
        kinds: npt.NDArray[np.uint8],
        offsets: Int64Array,
    ) -> None:
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.kinds = np.asarray(kinds, dtype=np.uint8)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if not (self.starts.shape == self.lengths.shape == self.kinds.shape == self.offsets.shape):
            raise ValueError("extent map arrays must have the same length")

    @classmethod
    def single(cls, start: int, length: int, kind: ExtentKind, offset: int = NO_OFFSET) -> ExtentMap:
        return cls(
            np.array([start], dtype=np.int64),
            np.array([length], dtype=np.int64),
            np.array([kind], dtype=np.uint8),
            np.array([offset], dtype=np.int64),
        )

    @classmethod
    def empty(cls) -> ExtentMap:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, np.zeros(0, dtype=np.uint8), z)

    @classmethod
    def concat(cls, maps: list[ExtentMap]) -> ExtentMap:
        if not maps:
            return cls.empty()
        return cls(
            np.concatenate([m.starts for m in maps]),
            np.concatenate([m.lengths for m in maps]),
            np.concatenate([m.kinds for m in maps]),
            np.concatenate([m.offsets for m in maps]),
        )

    # -- inspection --------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.starts.size)

    def __iter__(self) -> Iterator[Extent]:
        for s, n, k, o in zip(
            self.starts.tolist(),
            self.lengths.tolist(),
            self.kinds.tolist(),
            self.offsets.tolist(),
            strict=True,
        ):
            yield Extent(s, n, ExtentKind(k), None if o == NO_OFFSET else o)

    def to_json(self) -> list[dict[str, Any]]:
        starts, lengths = self.starts.tolist(), self.lengths.tolist()
        kinds, offsets = self.kinds.tolist(), self.offsets.tolist()
        return [
            {
                "start": starts[i],
                "length": lengths[i],
                "kind": _KIND_LABELS[kinds[i]],
                "offset": None if offsets[i] == NO_OFFSET else offsets[i],
            }
            for i in range(len(starts))
        ]

    def bytes_of(self, *kinds: ExtentKind) -> int:
        mask = np.isin(self.kinds, np.array(kinds, dtype=np.uint8))
        return int(self.lengths[mask].sum())

    def select(self, *kinds: ExtentKind) -> ExtentMap:
        mask = np.isin(self.kinds, np.array(kinds, dtype=np.uint8))
        return ExtentMap(self.starts[mask], self.lengths[mask], self.kinds[mask], self.offsets[mask])

    def guest_ranges(self) -> RangeSet:
        return RangeSet(self.starts, self.starts + self.lengths)

    def host_ranges(self) -> RangeSet:
        """Host byte ranges of the extents that have an offset."""
        mask = self.offsets != NO_OFFSET
        return RangeSet(self.offsets[mask], self.offsets[mask] + self.lengths[mask])

    # -- shaping -----------------------------------------------------------------------

    def merged(self) -> ExtentMap:
        """Adjacent extents of the same kind whose offsets continue become one."""
        if len(self) <= 1:
            return self
        s, n, k, o = self.starts, self.lengths, self.kinds, self.offsets
        contiguous = s[1:] == s[:-1] + n[:-1]
        same_kind = k[1:] == k[:-1]
        both_none = (o[1:] == NO_OFFSET) & (o[:-1] == NO_OFFSET)
        continues = (o[:-1] != NO_OFFSET) & (o[1:] == o[:-1] + n[:-1])
        joins = contiguous & same_kind & (both_none | continues)
        first = np.flatnonzero(np.concatenate([[True], ~joins]))
        ends = np.append(first[1:], s.size)
        end_bytes = s[ends - 1] + n[ends - 1]
        return ExtentMap(s[first], end_bytes - s[first], k[first], o[first])

    def restrict(self, ranges: RangeSet) -> ExtentMap:
        """The pieces of this map inside ``ranges``, offsets moved with their start."""
        if not len(self) or not ranges:
            return ExtentMap.empty()
        ends = self.starts + self.lengths
        order = np.argsort(self.starts, kind="stable")
        ai, bi = overlapping_pairs(self.starts[order], ends[order], ranges.starts, ranges.ends)
        ai = order[ai]
        new_start = np.maximum(self.starts[ai], ranges.starts[bi])
        new_end = np.minimum(ends[ai], ranges.ends[bi])
        shift = new_start - self.starts[ai]
        offs = np.where(self.offsets[ai] == NO_OFFSET, NO_OFFSET, self.offsets[ai] + shift)
        keep = new_end > new_start
        return ExtentMap(new_start[keep], (new_end - new_start)[keep], self.kinds[ai][keep], offs[keep])

    def clip(self, window: ByteRange) -> ExtentMap:
        return self.restrict(RangeSet([window.start], [window.end]))

    def require_covers(self, window: ByteRange, what: str) -> None:
        """Raise unless the map covers ``window`` in order, without gaps or overlaps.

        Drivers call this on their own output: a gap means the driver mis-read the
        image, and nothing may be punched on the strength of a wrong map.
        """
        if not window.length:
            return
        if not len(self):
            raise CorruptImageError(f"{what}: map of {window} is empty")
        ends = self.starts + self.lengths
        if int(self.starts[0]) != window.start or int(ends[-1]) != window.end:
            raise CorruptImageError(
                f"{what}: map covers [{int(self.starts[0])}, {int(ends[-1])}) not {window}"
            )
        if bool((self.lengths <= 0).any()) or bool((self.starts[1:] != ends[:-1]).any()):
            raise CorruptImageError(f"{what}: map of {window} has gaps or overlaps")

