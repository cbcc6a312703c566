"""Pending ranges in memory agree with the union of the live records, whatever happens."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vmreclaim.core.ranges import RangeSet
from vmreclaim.host import pending as pending_mod
from vmreclaim.host.pending import PendingRanges

pairs = st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 300)), min_size=1, max_size=12)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), pairs),
        st.tuples(st.just("reclaim"), st.integers(1, 20), st.booleans()),
    ),
    max_size=40,
)


def union(records: dict[int, RangeSet]) -> RangeSet:
    out = RangeSet()
    for r in records.values():
        out = out.union(r)
    return out


@given(ops)
def test_model_against_brute_force(operations: list[tuple]) -> None:  # type: ignore[type-arg]
    pending_mod.MERGE_AT, saved = 3, pending_mod.MERGE_AT  # exercise merging often
    try:
        p = PendingRanges()
        live: dict[int, RangeSet] = {}
        next_id = 1
        for op in operations:
            if op[0] == "add":
                ranges = RangeSet.from_ranges(op[1])
                p.add(next_id, float(next_id), ranges)
                live[next_id] = ranges
                next_id += 1
            else:
                _, max_ranges, succeed = op
                snap = p.snapshot(max_ranges)
                if snap is None:
                    assert not live
                    continue
                assert snap.ranges.union(snap.remainder) == union(live)
                assert len(snap.ranges) <= max_ranges
                # A record arrives while the reclaim runs: it must survive either way.
                late = RangeSet.from_ranges([(20_000 + next_id, 7)])
                p.add(next_id, float(next_id), late)
                late_id = next_id
                next_id += 1
                if succeed:
                    # Some ranges of the attempt stay pending (not verifiable): keep the first.
                    first = RangeSet(snap.ranges.starts[:1], snap.ranges.ends[:1])
                    remainder = snap.remainder.union(first if max_ranges % 2 else RangeSet())
                    rid = next_id if remainder else None
                    next_id += 1
                    p.consume(snap, rid, remainder)
                    live = {late_id: late}
                    if rid is not None:
                        live[rid] = remainder
                else:
                    p.abandon()
                    live[late_id] = late
            assert p.exact() == union(live)
            assert p.records == len(live)
            assert p.bytes_upper >= union(live).total
    finally:
        pending_mod.MERGE_AT = saved


def test_consume_reports_receive_times_only_when_nothing_is_left() -> None:
    p = PendingRanges()
    p.add(1, 10.0, RangeSet.from_ranges([(0, 10), (100, 10), (200, 10)]))
    p.add(2, 20.0, RangeSet.from_ranges([(300, 10)]))
    snap = p.snapshot(2)
    assert snap is not None and len(snap.ranges) == 2 and snap.oldest_received == 10.0
    assert p.consume(snap, 3) == []  # the remainder still waits
    assert p.oldest_received == 10.0
    snap = p.snapshot(10)
    assert snap is not None
    assert p.consume(snap, None) == [10.0]
    assert not p
