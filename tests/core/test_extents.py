"""Extent maps: merging and restricting, checked against a per-byte model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmreclaim.core.errors import CorruptImageError
from vmreclaim.core.extents import NO_OFFSET, ExtentKind, ExtentMap
from vmreclaim.core.ranges import ByteRange, RangeSet

rows = st.lists(
    st.tuples(st.integers(1, 8), st.sampled_from(list(ExtentKind)), st.booleans(), st.booleans()),
    min_size=1,
    max_size=12,
)


def build(spec: list[tuple[int, ExtentKind, bool, bool]]) -> ExtentMap:
    """Consecutive extents; ``continues`` places an extent's offset right after the previous."""
    starts, lengths, kinds, offsets = [], [], [], []
    pos, host = 0, 1000
    for length, kind, has_offset, continues in spec:
        starts.append(pos)
        lengths.append(length)
        kinds.append(kind)
        if has_offset:
            host = host if continues else host + 50
            offsets.append(host)
            host += length
        else:
            offsets.append(NO_OFFSET)
        pos += length
    return ExtentMap(np.array(starts), np.array(lengths), np.array(kinds), np.array(offsets))


def per_byte(m: ExtentMap) -> dict[int, tuple[int, int | None]]:
    out = {}
    for e in m:
        for i in range(e.length):
            out[e.start + i] = (int(e.kind), None if e.offset is None else e.offset + i)
    return out


@given(rows)
def test_merged_preserves_every_byte_and_merges_maximally(
    spec: list[tuple[int, ExtentKind, bool, bool]],
) -> None:
    m = build(spec)
    merged = m.merged()
    assert per_byte(merged) == per_byte(m)
    items = list(merged)
    for a, b in itertools.pairwise(items):
        same = a.kind == b.kind and (
            (a.offset is None and b.offset is None)
            or (a.offset is not None and b.offset is not None and b.offset == a.offset + a.length)
        )
        assert not same, f"{a} and {b} should have merged"


@given(rows, st.lists(st.tuples(st.integers(0, 100), st.integers(1, 20)), max_size=5))
def test_restrict_keeps_exactly_the_asked_bytes(
    spec: list[tuple[int, ExtentKind, bool, bool]], asked: list[tuple[int, int]]
) -> None:
    m = build(spec)
    ranges = RangeSet.from_ranges(asked)
    wanted = {b for r in ranges for b in range(r.start, r.end)}
    full = per_byte(m)
    assert per_byte(m.restrict(ranges)) == {b: v for b, v in full.items() if b in wanted}


def test_json_shape() -> None:
    m = ExtentMap.single(0, 4096, ExtentKind.COMPRESSED)
    assert m.to_json() == [{"start": 0, "length": 4096, "kind": "compressed", "offset": None}]


def test_require_covers_detects_gaps() -> None:
    m = ExtentMap.concat(
        [ExtentMap.single(0, 10, ExtentKind.ZERO), ExtentMap.single(20, 10, ExtentKind.ZERO)]
    )
    with pytest.raises(CorruptImageError, match="gaps"):
        m.require_covers(ByteRange(0, 30), "test")
    with pytest.raises(CorruptImageError, match="covers"):
        m.require_covers(ByteRange(0, 40), "test")
