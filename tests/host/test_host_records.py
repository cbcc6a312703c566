"""The bulk check of record ranges (the host's ingest hot path) accepts and refuses
exactly what the range-by-range check does, with the same message."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmreclaim.core.errors import ProtocolError, RangeError
from vmreclaim.core.model import DeletionRecord
from vmreclaim.core.ranges import ByteRange, RangeSet


def reference(raw: list[Any], disk_size: int | None) -> RangeSet:
    """The range-by-range rules, as the oracle."""
    pairs = []
    for i, pair in enumerate(raw):
        if not isinstance(pair, list) or len(pair) != 2 or not all(type(v) is int for v in pair):
            raise ProtocolError(f"record range #{i} is not [offset, length] of two integers")
        try:
            r = ByteRange(pair[0], pair[1])
        except RangeError as exc:
            raise ProtocolError(f"record range #{i}: {exc}") from exc
        if not r:
            raise ProtocolError(f"record range #{i} is empty")
        if disk_size is not None and r.end > disk_size:
            raise ProtocolError(f"record range #{i} {r} lies outside disk 'd' of {disk_size} bytes")
        pairs.append(r)
    return RangeSet.from_ranges(pairs)


numbers = st.one_of(
    st.integers(0, 1 << 20),
    st.integers(-5, 5),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63), 2**62]),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=2),
    st.none(),
)
pair = st.one_of(
    st.lists(st.integers(0, 1 << 20), min_size=2, max_size=2),
    st.lists(numbers, min_size=2, max_size=2),
    st.lists(numbers, max_size=3),
    numbers,
)


@given(st.lists(pair, min_size=1, max_size=30), st.one_of(st.none(), st.integers(0, 1 << 21)))
def test_bulk_and_range_by_range_agree(raw: list[Any], disk_size: int | None) -> None:
    doc = {"disk": "d", "ranges": raw}
    try:
        want: RangeSet | str = reference(raw, disk_size)
    except ProtocolError as exc:
        want = str(exc)
    try:
        got: RangeSet | str = DeletionRecord.from_json(doc, disk_size=disk_size).ranges
    except ProtocolError as exc:
        got = str(exc)
    assert got == want


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ([[0, 4096], [True, 4096]], "range #1 is not [offset, length] of two integers"),
        ([[0, 4096], [2**63 - 1, 1]], "range #1: byte range"),
        ([[0, 4096], [8192, 0]], "range #1 is empty"),
        ([[0, 4096], [1 << 21, 4096]], "lies outside disk"),
    ],
)
def test_one_bad_range_among_good_ones_is_named(raw: list[Any], words: str) -> None:
    with pytest.raises(ProtocolError, match=words.replace("[", r"\[").replace("]", r"\]")):
        DeletionRecord.from_json({"disk": "d", "ranges": raw}, disk_size=1 << 21)
