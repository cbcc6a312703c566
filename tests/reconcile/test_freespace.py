"""The free-space wire encoding: hostile chunks first, then round trips."""

from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmreclaim.core import freespace
from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.freespace import Chunk, FreeSpaceDecoder, decode, encode
from vmreclaim.core.ranges import RangeSet

GiB = 1 << 30
DISK = 8 * GiB


def varints(values: list[int]) -> bytes:
    out = bytearray()
    for v in values:
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def chunk(
    values: list[int], *, unit: int = 4096, ranges: int | None = None, total: int | None = None
) -> Chunk:
    lengths = values[1::2]
    return Chunk(
        unit=unit,
        ranges=len(values) // 2 if ranges is None else ranges,
        bytes=sum(lengths) * unit if total is None else total,
        data=base64.b64encode(zlib.compress(varints(values))).decode(),
    )


def refuse(chunks: list[Chunk], match: str, disk_size: int = DISK) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(chunks, disk="disk0", disk_size=disk_size)


# -- hostile input ----------------------------------------------------------------------------


def test_overlapping_ranges_are_refused() -> None:
    # [0, 4) then a gap of 0 after it: touching (not coalesced), so refused.
    refuse([chunk([0, 4, 0, 4])], "overlaps or touches")


def test_unsorted_across_chunks_is_refused() -> None:
    refuse([chunk([100, 4]), chunk([10, 4])], "does not lie past the previous chunk")


def test_range_past_the_disk_end_is_refused() -> None:
    blocks = DISK // 4096
    refuse([chunk([blocks - 1, 2])], "past the disk end")
    refuse([chunk([blocks + 5, 1])], "past the disk end")


def test_sum_that_would_wrap_int64_is_refused() -> None:
    # Each number below the disk size, but their sum past 2**63.
    big = (1 << 63) // 512 - 1
    values = [1, big] * 2 + [1, big]
    refuse([chunk(values, unit=512)], "past the disk end", disk_size=(1 << 63) - 1)


def test_empty_range_is_refused() -> None:
    refuse([chunk([4, 0])], "is empty")


def test_decompression_bomb_stops_at_the_cap() -> None:
    bomb = zlib.compress(b"\x01" * (freespace.MAX_CHUNK_RAW * 8), 9)
    assert len(bomb) < 100_000
    refuse([Chunk(4096, 1, 4096, base64.b64encode(bomb).decode())], "inflates past")


def test_truncated_zlib_stream_is_refused() -> None:
    packed = zlib.compress(varints([1, 2, 3, 4]))[:-3]
    refuse([Chunk(4096, 2, 6 * 4096, base64.b64encode(packed).decode())], "truncated")


def test_trailing_bytes_after_zlib_are_refused() -> None:
    packed = zlib.compress(varints([1, 2])) + b"junk"
    refuse([Chunk(4096, 1, 2 * 4096, base64.b64encode(packed).decode())], "after the zlib stream")


def test_cut_off_varint_is_refused() -> None:
    raw = varints([1, 2]) + b"\x85"
    refuse([Chunk(4096, 1, 2 * 4096, base64.b64encode(zlib.compress(raw)).decode())], "cut off")


def test_overlong_varint_is_refused() -> None:
    raw = b"\x81" * 12 + b"\x01" + varints([2])
    refuse([Chunk(4096, 1, 2 * 4096, base64.b64encode(zlib.compress(raw)).decode())], "longer than")


def test_not_base64_and_not_zlib_are_refused() -> None:
    refuse([Chunk(4096, 1, 4096, "not base64!")], "not base64")
    refuse([Chunk(4096, 1, 4096, base64.b64encode(b"plain").decode())], "not zlib")


def test_claims_that_disagree_with_the_data_are_refused() -> None:
    refuse([chunk([1, 2, 3, 4], ranges=3)], "numbers for 3 ranges")
    refuse([chunk([1, 2, 3, 4], total=4096)], "cover")


def test_bad_units_are_refused() -> None:
    refuse([chunk([1, 2], unit=3000)], "power of two")
    refuse([chunk([1, 2], unit=1 << 20)], "power of two")
    refuse([chunk([1, 2], unit=4096), chunk([10, 2], unit=512)], "differs")


def test_too_many_chunks_and_ranges_are_refused() -> None:
    with pytest.raises(ProtocolError, match="chunks"):
        FreeSpaceDecoder(disk="disk0", disk_size=DISK, chunks=freespace.MAX_CHUNKS + 1)
    decoder = FreeSpaceDecoder(disk="disk0", disk_size=DISK, chunks=2, max_ranges=3)
    decoder.add(0, chunk([1, 1, 1, 1]))
    with pytest.raises(ProtocolError, match="more than 3 ranges"):
        decoder.add(1, chunk([100, 1, 1, 1]))


def test_chunks_out_of_order_extra_or_missing_are_refused() -> None:
    decoder = FreeSpaceDecoder(disk="disk0", disk_size=DISK, chunks=2)
    with pytest.raises(ProtocolError, match="expected chunk 0"):
        decoder.add(1, chunk([1, 1]))
    decoder.add(0, chunk([1, 1]))
    with pytest.raises(ProtocolError, match="1 of 2 chunks"):
        decoder.result()
    decoder.add(1, chunk([10, 1]))
    with pytest.raises(ProtocolError, match="already received"):
        decoder.add(2, chunk([100, 1]))


def test_oversized_text_is_refused_before_decoding() -> None:
    refuse([Chunk(4096, 1, 4096, "A" * (freespace.MAX_CHUNK_TEXT + 4))], "characters of data")


def test_an_empty_chunk_is_refused_but_no_chunks_is_empty_space() -> None:
    refuse([Chunk(4096, 0, 0, base64.b64encode(zlib.compress(b"")).decode())], "0 ranges")
    assert decode([], disk="disk0", disk_size=DISK) == RangeSet()


# -- round trips --------------------------------------------------------------------------------


@st.composite
def free_sets(draw: st.DrawFn) -> RangeSet:
    unit = draw(st.sampled_from([512, 1024, 4096]))
    pairs = draw(st.lists(st.tuples(st.integers(1, 1 << 20), st.integers(1, 1 << 12)), max_size=200))
    starts, ends, at = [], [], 0
    for gap, length in pairs:
        at += gap * unit
        starts.append(at)
        at += length * unit
        ends.append(at)
    return RangeSet(starts, ends)


@settings(max_examples=200, deadline=None)
@given(free_sets())
def test_round_trip(ranges: RangeSet) -> None:
    size = max(DISK, int(ranges.bounds.end))
    encoded = encode(ranges)
    assert not encoded.partial and encoded.total_bytes == ranges.total
    assert decode(encoded.chunks, disk="d", disk_size=size) == ranges


def test_millions_of_ranges_chunk_under_the_line_limit() -> None:
    rng = np.random.default_rng(7)
    n = 1_100_000
    gaps = rng.integers(1, 200, n)
    lengths = rng.integers(1, 300, n)
    ends = np.cumsum(gaps + lengths) * 4096
    ranges = RangeSet(ends - lengths * 4096, ends, _normalised=True)
    encoded = encode(ranges)
    assert len(encoded.chunks) > 1
    assert all(len(c.data) < 2 * 1024 * 1024 for c in encoded.chunks)
    assert sum(len(c.data) for c in encoded.chunks) < 4 * n  # < 4 bytes per range
    assert decode(encoded.chunks, disk="d", disk_size=int(ends[-1])) == ranges


def test_over_the_cap_keeps_the_largest_ranges() -> None:
    ranges = RangeSet([0, 10_240, 20_480, 30_720], [512, 14_336, 20_992, 38_912])
    encoded = encode(ranges, max_ranges=2)
    assert encoded.partial and encoded.dropped == 2
    got = decode(encoded.chunks, disk="d", disk_size=DISK)
    assert got == RangeSet([10_240, 30_720], [14_336, 38_912])


def test_unaligned_ranges_shrink_inward() -> None:
    ranges = RangeSet([100, 5000], [2000, 9000])
    got = decode(encode(ranges).chunks, disk="d", disk_size=DISK)
    assert got == RangeSet([512, 5120], [1536, 8704])
    assert ranges.contains(got)


def test_unit_falls_to_the_sector_for_odd_partition_offsets() -> None:
    # A partition at sector 63: block-aligned inside the filesystem, not on the disk.
    ranges = RangeSet([63 * 512], [63 * 512 + 8 * 4096])
    encoded = encode(ranges)
    assert encoded.chunks[0].unit == 512
    assert decode(encoded.chunks, disk="d", disk_size=DISK) == ranges
