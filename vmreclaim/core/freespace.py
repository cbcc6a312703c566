"""The compact wire form of a filesystem's whole free space (reconciliation).

A reconciliation sends every free range of a virtual disk (docs/protocol.md,
``free_space``). A fragmented 1 TiB filesystem has millions of free extents: as JSON
pairs that is tens of megabytes, far over one protocol line. So the ranges travel as:

* **units**: every start and length is divided by ``unit``, the largest power of two
  (512 to 64 KiB) that divides them all — the filesystem block size, usually — so the
  numbers are small;
* **delta + varint**: the ranges are sorted and disjoint, so each is written as the gap
  since the previous range's end and its length, both as unsigned LEB128 varints (a
  gap of a few blocks and a length of a few blocks is two bytes);
* **zlib** over that, then base64 (JSON lines carry text);
* **chunks**: at most :data:`MAX_CHUNK_RANGES` ranges and :data:`MAX_CHUNK_RAW` bytes of
  varints per chunk, so a chunk is always far under the 4 MiB line limit; each chunk is
  decodable alone (its first gap counts from offset 0) and chunks come in disk order.

The decoder is the host reading guest bytes, so it trusts nothing: base64 must be
canonical, zlib output is capped before it is produced (no decompression bomb), every
varint must end inside the chunk and fit 63 bits, ranges must be non-empty, sorted,
disjoint and not even touching (the agent coalesces), inside the disk, counted and
summed as the chunk claims; chunks must come in order, with one unit, and the whole
reconciliation is capped at :data:`MAX_FREE_RANGES` ranges. Anything else is a
:class:`~vmreclaim.core.errors.ProtocolError` naming the chunk and the problem.

Over the cap, the *encoder* keeps the largest ranges (what it drops stays allocated,
which is safe) and says so (``partial``): a subset of free space is still free space.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.ranges import Int64Array, RangeSet

#: The whole free space of a disk is at most this many ranges (64 MiB of int64 pairs on
#: the host while it is decoded and intersected: a per-VM memory bound).
MAX_FREE_RANGES = 4_194_304
#: Ranges in one chunk.
MAX_CHUNK_RANGES = 262_144
#: Varint bytes in one chunk before zlib: base64 of its worst-case zlib output stays
#: under 2 MiB, half the line limit, leaving room for the JSON around it.
MAX_CHUNK_RAW = 1_400_000
#: Chunks in one reconciliation: enough for MAX_FREE_RANGES at the worst varint sizes.
MAX_CHUNKS = 256
#: The base64 text of one chunk (what a JSON line carries) is at most this long.
#: (zlib's own worst-case bound, ``compressBound``, then base64).
_ZLIB_BOUND = MAX_CHUNK_RAW + (MAX_CHUNK_RAW >> 12) + (MAX_CHUNK_RAW >> 14) + (MAX_CHUNK_RAW >> 25) + 13
MAX_CHUNK_TEXT = 4 * ((_ZLIB_BOUND + 2) // 3)
MIN_UNIT = 512
MAX_UNIT = 65536
#: A varint of at most 9 bytes carries 63 bits: every offset fits.
_MAX_VARINT = 9


@dataclass(frozen=True)
class Chunk:
    """One encoded chunk: ``ranges`` ranges of ``bytes`` bytes in ``data``."""

    unit: int
    ranges: int
    bytes: int
    data: str


@dataclass(frozen=True)
class Encoded:
    chunks: list[Chunk]
    #: Ranges dropped (the smallest) to stay under :data:`MAX_FREE_RANGES`.
    dropped: int
    total_ranges: int
    total_bytes: int

    @property
    def partial(self) -> bool:
        return self.dropped > 0


# -- the two messages (protocol version 2; vmreclaim.core.protocol puts them in its unions) --


class Reconcile(BaseModel):
    """Host → agent: send the whole free space of ``disk`` (answered by ``free_space``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["reconcile"] = "reconcile"
    #: Chosen by the host, unique on the connection; echoed by every answering chunk.
    id: int = Field(ge=0)
    disk: str = Field(min_length=1, max_length=256)


class FreeSpace(BaseModel):
    """Agent → host: chunk ``chunk`` of ``chunks`` of a disk's free space.

    ``chunks == 0`` (one message, ``chunk`` 0, no data) is an answer without ranges:
    nothing is free, or ``error`` says why the agent could not tell.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["free_space"] = "free_space"
    id: int = Field(ge=0)
    disk: str = Field(min_length=1, max_length=256)
    chunk: int = Field(ge=0, lt=MAX_CHUNKS)
    chunks: int = Field(ge=0, le=MAX_CHUNKS)
    unit: int = Field(default=MAX_UNIT, ge=MIN_UNIT, le=MAX_UNIT)
    ranges: int = Field(default=0, ge=0, le=MAX_CHUNK_RANGES)
    bytes: int = Field(default=0, ge=0, le=2**63 - 1)
    data: str = Field(default="", max_length=MAX_CHUNK_TEXT)
    #: The agent dropped its smallest free ranges to stay under MAX_FREE_RANGES.
    partial: bool = False
    error: str | None = Field(default=None, max_length=1024)

    def as_chunk(self) -> Chunk:
        return Chunk(self.unit, self.ranges, self.bytes, self.data)


def messages(request: Reconcile, encoded: Encoded) -> list[FreeSpace]:
    """The ``free_space`` answer to ``request``: one message per chunk (at least one)."""
    n = len(encoded.chunks)
    if n == 0:
        return [FreeSpace(id=request.id, disk=request.disk, chunk=0, chunks=0)]
    return [
        FreeSpace(
            id=request.id,
            disk=request.disk,
            chunk=i,
            chunks=n,
            unit=c.unit,
            ranges=c.ranges,
            bytes=c.bytes,
            data=c.data,
            partial=encoded.partial,
        )
        for i, c in enumerate(encoded.chunks)
    ]


def _unit_of(ranges: RangeSet) -> int:
    if not ranges:
        return MAX_UNIT
    bits = int(np.bitwise_or.reduce(ranges.starts) | np.bitwise_or.reduce(ranges.lengths))
    bits |= MAX_UNIT
    unit = bits & -bits
    return max(MIN_UNIT, unit)


def _varints(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """LEB128 of every value, vectorised (millions of values per second)."""
    if values.size == 0:
        return np.zeros(0, np.uint8)
    sizes = np.ones(values.size, np.int64)
    for k in range(1, _MAX_VARINT):
        sizes += values >= np.uint64(1 << (7 * k))
    ends = np.cumsum(sizes)
    starts = ends - sizes
    out = np.zeros(int(ends[-1]), np.uint8)
    for k in range(_MAX_VARINT):
        has = sizes > k
        if not has.any():
            break
        byte = ((values[has] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        more = (sizes[has] > k + 1).astype(np.uint8) << 7
        out[starts[has] + k] = byte | more
    return out


def _unvarints(raw: npt.NDArray[np.uint8], where: str) -> npt.NDArray[np.uint64]:
    if raw.size == 0:
        return np.zeros(0, np.uint64)
    last = (raw & 0x80) == 0
    if not last[-1]:
        raise ProtocolError(f"{where}: the last varint is cut off")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    if int((ends - starts).max()) >= _MAX_VARINT:
        raise ProtocolError(f"{where}: a varint longer than {_MAX_VARINT} bytes")
    value_of_byte = np.repeat(np.arange(ends.size), ends - starts + 1)
    pos = np.arange(raw.size) - starts[value_of_byte]
    parts = (raw & 0x7F).astype(np.uint64) << (np.uint64(7) * pos.astype(np.uint64))
    return np.add.reduceat(parts, starts)


def encode(ranges: RangeSet, *, max_ranges: int = MAX_FREE_RANGES) -> Encoded:
    """Encode ``ranges`` (disk bytes) in chunks; over ``max_ranges``, keep the largest."""
    total_ranges = len(ranges)
    dropped = 0
    if total_ranges > max_ranges:
        keep = np.sort(np.argsort(-ranges.lengths, kind="stable")[:max_ranges])
        ranges = RangeSet(ranges.starts[keep], ranges.ends[keep], _normalised=True)
        dropped = total_ranges - max_ranges
    unit = _unit_of(ranges)
    if ranges and int(np.bitwise_or.reduce(ranges.starts | ranges.lengths)) % unit:
        # Not sector-aligned (no real filesystem does that): shrink inward, which only
        # leaves bytes allocated.
        ranges = ranges.align_inward(unit)
        unit = _unit_of(ranges)
    chunks: list[Chunk] = []
    starts = ranges.starts // unit
    ends = ranges.ends // unit
    i = 0
    n = len(ranges)
    while i < n:
        j = min(n, i + MAX_CHUNK_RANGES)
        while True:
            s, e = starts[i:j], ends[i:j]
            prev = np.concatenate(([0], e[:-1]))
            pairs = np.empty(2 * (j - i), np.uint64)
            pairs[0::2] = (s - prev).astype(np.uint64)
            pairs[1::2] = (e - s).astype(np.uint64)
            raw = _varints(pairs)
            if raw.size <= MAX_CHUNK_RAW or j - i == 1:
                break
            j = i + max(1, (j - i) // 2)
        text = base64.b64encode(zlib.compress(raw.tobytes(), 6)).decode("ascii")
        chunks.append(Chunk(unit, j - i, int((e - s).sum()) * unit, text))
        i = j
    return Encoded(chunks, dropped, len(ranges), ranges.total)


class FreeSpaceDecoder:
    """Reassembles one reconciliation's chunks, validating each as it arrives."""

    def __init__(self, *, disk: str, disk_size: int, chunks: int, max_ranges: int = MAX_FREE_RANGES) -> None:
        if not 0 <= chunks <= MAX_CHUNKS:
            raise ProtocolError(f"free space of disk {disk!r}: {chunks} chunks (at most {MAX_CHUNKS})")
        self.disk = disk
        self.disk_size = disk_size
        self.expected = chunks
        self.max_ranges = max_ranges
        self.received = 0
        self.unit: int | None = None
        self._end = -1  # end (bytes) of the last range so far; the next must start past it
        self._starts: list[Int64Array] = []
        self._ends: list[Int64Array] = []
        self._count = 0

    @property
    def complete(self) -> bool:
        return self.received == self.expected

    def add(self, index: int, chunk: Chunk) -> None:
        """Validate and keep chunk ``index`` (they must come 0, 1, 2, ...)."""
        where = f"free space of disk {self.disk!r}, chunk {index}"
        if index != self.received:
            raise ProtocolError(f"{where}: expected chunk {self.received} of {self.expected}")
        if self.complete:
            raise ProtocolError(f"{where}: all {self.expected} chunks were already received")
        unit = chunk.unit
        if unit < MIN_UNIT or unit > MAX_UNIT or unit & (unit - 1):
            raise ProtocolError(f"{where}: unit {unit} is not a power of two in [{MIN_UNIT}, {MAX_UNIT}]")
        if self.unit is not None and unit != self.unit:
            raise ProtocolError(f"{where}: unit {unit} differs from the first chunk's {self.unit}")
        if not 1 <= chunk.ranges <= MAX_CHUNK_RANGES:
            raise ProtocolError(f"{where}: {chunk.ranges} ranges (1 to {MAX_CHUNK_RANGES})")
        if self._count + chunk.ranges > self.max_ranges:
            raise ProtocolError(f"{where}: more than {self.max_ranges} ranges in all")
        if len(chunk.data) > MAX_CHUNK_TEXT:
            raise ProtocolError(f"{where}: {len(chunk.data)} characters of data (at most {MAX_CHUNK_TEXT})")
        try:
            packed = base64.b64decode(chunk.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"{where}: data is not base64: {exc}") from None
        raw = _inflate(packed, where)
        values = _unvarints(np.frombuffer(raw, np.uint8), where)
        if values.size != 2 * chunk.ranges:
            raise ProtocolError(f"{where}: {values.size} numbers for {chunk.ranges} ranges")
        starts, ends = self._ranges(values, unit, where)
        if int((ends - starts).sum()) != chunk.bytes:
            raise ProtocolError(
                f"{where}: its ranges cover {int((ends - starts).sum())} bytes, not {chunk.bytes}"
            )
        if starts[0] <= self._end:
            raise ProtocolError(
                f"{where}: range at byte {int(starts[0])} does not lie past the previous "
                f"chunk's end {self._end}"
            )
        self.unit = unit
        self._starts.append(starts)
        self._ends.append(ends)
        self._end = int(ends[-1])
        self._count += chunk.ranges
        self.received += 1

    def _ranges(self, values: npt.NDArray[np.uint64], unit: int, where: str) -> tuple[Int64Array, Int64Array]:
        limit = self.disk_size // unit
        # Bounds before any arithmetic: no value can exceed the disk, so sums cannot wrap.
        if int(values.max()) > limit:
            raise ProtocolError(
                f"{where}: a number {int(values.max())} × {unit} lies past the disk end {self.disk_size}"
            )
        v = values.astype(np.int64)
        gaps, lengths = v[0::2], v[1::2]
        if int(lengths.min()) <= 0:
            raise ProtocolError(f"{where}: range #{int(np.argmin(lengths))} is empty")
        if gaps.size > 1 and int(gaps[1:].min()) <= 0:
            i = 1 + int(np.argmin(gaps[1:]))
            raise ProtocolError(f"{where}: range #{i} overlaps or touches the one before (not coalesced)")
        # Every number is at most the disk size, but half a million of them can still sum
        # past 2**63: a float sum (exact enough) refuses that before the int64 cumsum.
        if float(v.sum(dtype=np.float64)) > limit * 1.001 + 1:
            raise ProtocolError(f"{where}: ranges reach past the disk end {self.disk_size}")
        ends = np.cumsum(gaps + lengths)
        if int(ends[-1]) > limit:
            raise ProtocolError(
                f"{where}: ranges reach byte {int(ends[-1]) * unit}, past the disk end {self.disk_size}"
            )
        starts = ends - lengths
        return starts * unit, ends * unit

    def result(self) -> RangeSet:
        if not self.complete:
            raise ProtocolError(
                f"free space of disk {self.disk!r}: {self.received} of {self.expected} chunks received"
            )
        if not self._starts:
            return RangeSet()
        return RangeSet(np.concatenate(self._starts), np.concatenate(self._ends), _normalised=True)


def _inflate(packed: bytes, where: str) -> bytes:
    """zlib with the output capped before it is produced: a bomb stops at the cap."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed, MAX_CHUNK_RAW)
    except zlib.error as exc:
        raise ProtocolError(f"{where}: data is not zlib: {exc}") from None
    if inflater.unconsumed_tail:
        raise ProtocolError(f"{where}: data inflates past {MAX_CHUNK_RAW} bytes")
    if not inflater.eof:
        raise ProtocolError(f"{where}: zlib stream is truncated")
    if inflater.unused_data:
        raise ProtocolError(f"{where}: {len(inflater.unused_data)} bytes after the zlib stream")
    return raw


def decode(chunks: list[Chunk], *, disk: str, disk_size: int) -> RangeSet:
    """Decode a whole list of chunks (tests, benchmarks): the same checks as the host."""
    decoder = FreeSpaceDecoder(disk=disk, disk_size=disk_size, chunks=len(chunks))
    for i, chunk in enumerate(chunks):
        decoder.add(i, chunk)
    return decoder.result()
