"""Range algebra checked against a byte-set model (hypothesis)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmreclaim.core.errors import RangeError
from vmreclaim.core.ranges import MAX_OFFSET, ByteRange, RangeSet

pairs = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=12)


def as_bytes(ranges: RangeSet) -> set[int]:
    return {b for r in ranges for b in range(r.start, r.end)}


def model(ps: list[tuple[int, int]]) -> set[int]:
    return {b for s, n in ps for b in range(s, s + n)}


@given(pairs)
def test_rangeset_is_sorted_disjoint_and_coalesced(ps: list[tuple[int, int]]) -> None:
    rs = RangeSet.from_ranges(ps)
    assert as_bytes(rs) == model(ps)
    items = list(rs)
    for a, b in itertools.pairwise(items):
        assert a.end < b.start  # adjacent ranges would have merged
    assert all(r.length > 0 for r in items)
    assert rs.total == len(model(ps))


@given(pairs, pairs)
def test_union_intersect_subtract_match_sets(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    ra, rb = RangeSet.from_ranges(a), RangeSet.from_ranges(b)
    assert as_bytes(ra | rb) == model(a) | model(b)
    assert as_bytes(ra & rb) == model(a) & model(b)
    assert as_bytes(ra - rb) == model(a) - model(b)
    assert ra.contains(ra & rb)


@given(pairs, st.integers(0, 200), st.integers(0, 200))
def test_clip_and_complement(ps: list[tuple[int, int]], start: int, length: int) -> None:
    rs = RangeSet.from_ranges(ps)
    window = ByteRange(start, length)
    inside = set(range(window.start, window.end))
    assert as_bytes(rs.clip(window)) == model(ps) & inside
    assert as_bytes(rs.complement(window)) == inside - model(ps)


@given(pairs, st.sampled_from([1, 2, 4, 512, 4096]))
def test_align_inward_never_leaves_the_range(ps: list[tuple[int, int]], align: int) -> None:
    rs = RangeSet.from_ranges(ps)
    aligned = rs.align_inward(align)
    assert as_bytes(aligned) <= as_bytes(rs)
    for r in aligned:
        assert r.start % align == 0 and r.end % align == 0
    # Every whole aligned block inside a range survives.
    for r in rs:
        first = -(-r.start // align) * align
        for block in range(first, r.end - align + 1, align):
            assert set(range(block, block + align)) <= as_bytes(aligned)


@given(st.integers(0, 100), st.integers(0, 50), st.integers(0, 100), st.integers(0, 50))
def test_byterange_helpers(s1: int, n1: int, s2: int, n2: int) -> None:
    a, b = ByteRange(s1, n1), ByteRange(s2, n2)
    sa, sb = set(range(a.start, a.end)), set(range(b.start, b.end))
    inter = a.intersect(b)
    assert set(range(inter.start, inter.end)) == sa & sb
    assert set().union(*(set(range(r.start, r.end)) for r in a.subtract(b))) == sa - sb
    if a.touches(b):
        m = a.merge(b)
        assert set(range(m.start, m.end)) == sa | sb or not (sa and sb)
    else:
        with pytest.raises(RangeError):
            a.merge(b)


def test_shift_and_pairs() -> None:
    rs = RangeSet.from_ranges([(10, 5), (15, 5), (100, 1)])
    assert rs.to_pairs() == [[10, 10], [100, 1]]
    assert rs.shift(1000).to_pairs() == [[1010, 10], [1100, 1]]
    with pytest.raises(RangeError):
        rs.shift(-11)


@pytest.mark.parametrize("start,length", [(-1, 10), (0, -1), (MAX_OFFSET, 1), (2**62, 2**62)])
def test_invalid_ranges_are_refused_with_a_message(start: int, length: int) -> None:
    with pytest.raises(RangeError, match="negative or overflows"):
        RangeSet.from_ranges([(start, length)])


def test_large_sets_are_vectorised() -> None:
    import numpy as np

    starts = np.arange(0, 4096 * 200_000, 8192, dtype=np.int64)
    rs = RangeSet.from_arrays(starts, np.full(starts.size, 4096, dtype=np.int64))
    assert len(rs) == starts.size
    other = RangeSet.from_arrays(starts + 2048, np.full(starts.size, 4096, dtype=np.int64))
    assert (rs & other).total == starts.size * 2048
    assert (rs | other).total == starts.size * 6144
