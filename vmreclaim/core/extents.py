"""Extent maps: where each guest byte of a virtual disk lives in the image file.

An :class:`ExtentMap` is the answer of a format driver's ``map``: consecutive guest
ranges, each with a :class:`ExtentKind` and, where the bytes are stored, the host byte
offset inside the image's data file. It is held as four parallel numpy arrays so that a
64 GiB qcow2 with hundreds of thousands of clusters maps without one Python object per
cluster. The JSON shape is the ``image map`` contract of DESIGN.md section 8.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

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


def _digits_width(values: Int64Array) -> int:
    """Decimal digits of the largest value (values are never negative)."""
    return len(str(int(values.max()))) if values.size else 1


def _fill_digits(out: npt.NDArray[np.uint8], col: int, width: int, values: Int64Array) -> None:
    """Write ``values`` right-aligned in ``out[:, col:col+width]`` as ASCII digits.

    Leading positions stay 0 (padding); the last digit is always written, so 0 prints.
    Digits are built column-major (contiguous writes) and copied into place once.
    """
    v = np.array(values, dtype=np.int64)
    digits = np.empty((width, v.size), dtype=np.uint8)
    for j in range(width - 1, -1, -1):
        v, rest = np.divmod(v, 10)
        d = rest.astype(np.uint8)
        d += 48
        if j != width - 1:
            d *= (v != 0) | (rest != 0)  # a leading zero is padding
        digits[j] = d
    out[:, col : col + width] = digits.T


#: Rows rendered per piece by :meth:`ExtentMap.write_json` (fits a core's cache).
_JSON_CHUNK = 1 << 15


class _JsonLayout:
    """Fixed-width byte rows of ``image map --json``; 0 bytes are padding."""

    def __init__(self, start_width: int, length_width: int, offset_width: int) -> None:
        labels = [f'"{label}"'.encode() for label in _KIND_LABELS]
        kind_width = max(len(b) for b in labels)
        pieces: list[bytes | int] = [
            b'{"start": ',
            start_width,
            b', "length": ',
            length_width,
            b', "kind": ',
            kind_width,
            b', "offset": ',
            offset_width,
            b"},\n",
        ]
        self.width = sum(p if isinstance(p, int) else len(p) for p in pieces)
        self.template = np.zeros(self.width, dtype=np.uint8)
        self.fields: list[tuple[int, int]] = []
        col = 0
        for piece in pieces:
            if isinstance(piece, int):
                self.fields.append((col, piece))
                col += piece
            else:
                self.template[col : col + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                col += len(piece)
        self.kind_table = np.zeros((len(labels), kind_width), dtype=np.uint8)
        for i, label in enumerate(labels):
            self.kind_table[i, : len(label)] = np.frombuffer(label, dtype=np.uint8)
        self.null = np.zeros(offset_width, dtype=np.uint8)
        self.null[-4:] = np.frombuffer(b"null", dtype=np.uint8)

    def render(
        self,
        starts: Int64Array,
        lengths: Int64Array,
        kinds: npt.NDArray[np.uint8],
        offsets: Int64Array,
        *,
        last: bool,
    ) -> bytes:
        """The rows of one chunk; ``offsets`` uses -1 for null."""
        out = np.empty((starts.size, self.width), dtype=np.uint8)
        out[:] = self.template
        (sc, sw), (lc, lw), (kc, kw), (oc, ow) = self.fields
        _fill_digits(out, sc, sw, starts)
        _fill_digits(out, lc, lw, lengths)
        out[:, kc : kc + kw] = self.kind_table[kinds]
        nulls = offsets < 0
        _fill_digits(out, oc, ow, np.where(nulls, 0, offsets))
        if bool(nulls.any()):
            out[nulls, oc : oc + ow] = self.null
        if last:
            out[-1, -2] = 0  # no comma after the last extent
        return out.tobytes().translate(None, b"\0")  # drops the padding at C speed


class ExtentMap:
    """Guest ranges in order, each with a kind and a host offset (``NO_OFFSET`` if none).

    The constructor takes the arrays as they are; drivers build maps cluster by
    cluster in numpy and call :meth:`merged` once at the end.
    """

    __slots__ = ("kinds", "lengths", "offsets", "starts")

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

    def write_json(self, stream: IO[str]) -> None:
        """Write :meth:`to_json` as one JSON document, one extent per line.

        ``image map --json`` of a fragmented 64 GiB image has hundreds of thousands of
        extents; building a dict per extent and running the pure-Python indenting
        encoder takes seconds. Here the decimal digits of every column are computed
        with numpy in fixed-width byte rows, chunk by chunk on two threads (numpy
        releases the GIL), and the padding is dropped with ``bytes.translate``.
        """
        n = len(self)
        if not n:
            stream.write("[]\n")
            return
        offsets = np.where(self.offsets == NO_OFFSET, -1, self.offsets)
        layout = _JsonLayout(
            _digits_width(self.starts), _digits_width(self.lengths), max(4, _digits_width(offsets))
        )
        bounds = [*range(0, n, _JSON_CHUNK), n]
        jobs = list(itertools.pairwise(bounds))

        def render(job: tuple[int, int]) -> bytes:
            lo, hi = job
            return layout.render(
                self.starts[lo:hi], self.lengths[lo:hi], self.kinds[lo:hi], offsets[lo:hi], last=hi == n
            )

        if len(jobs) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=2) as pool:
                parts = list(pool.map(render, jobs))
        else:
            parts = [render(jobs[0])]
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            stream.flush()
            buffer.write(b"[\n")
            for part in parts:
                buffer.write(part)
            buffer.write(b"]\n")
            buffer.flush()
        else:
            stream.write("[\n" + b"".join(parts).decode("ascii") + "]\n")

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


def trim_to_window(extents: ExtentMap, window: ByteRange) -> ExtentMap:
    """Cut the first and last extents of an ordered, gap-free map to ``window``.

    Drivers map whole clusters or blocks; only the two ends can stick out of the asked
    window, so this is O(1) where :meth:`ExtentMap.clip` is O(n).
    """
    if not len(extents):
        return extents
    ends = extents.starts + extents.lengths
    lo = int(np.searchsorted(ends, window.start, side="right"))
    hi = int(np.searchsorted(extents.starts, window.end, side="left"))
    starts = extents.starts[lo:hi].copy()
    lengths = extents.lengths[lo:hi].copy()
    offsets = extents.offsets[lo:hi].copy()
    if starts.size:
        cut = window.start - int(starts[0])
        if cut > 0:
            starts[0] += cut
            lengths[0] -= cut
            if offsets[0] != NO_OFFSET:
                offsets[0] += cut
        over = int(starts[-1] + lengths[-1]) - window.end
        if over > 0:
            lengths[-1] -= over
    return ExtentMap(starts, lengths, extents.kinds[lo:hi], offsets)
