"""When a disk is due for reconciliation (pure rules of ReconcileClock)."""

from __future__ import annotations

from vmreclaim.host.reconcile import DiskReconcile, ReconcileClock

MiB = 1 << 20
clock = ReconcileClock(interval_seconds=3600, growth_bytes=16 * MiB, min_gap_seconds=15)


def test_first_look_is_the_connection() -> None:
    assert clock.due(DiskReconcile(), allocated=0, now_mono=100) == "connect"


def test_growth_past_the_threshold_but_not_within_the_gap() -> None:
    st = DiskReconcile(asked_mono=100, allocated_at_last=100 * MiB)
    assert clock.due(st, allocated=110 * MiB, now_mono=200) is None
    assert clock.due(st, allocated=117 * MiB, now_mono=110) is None, "within min_gap_seconds"
    assert clock.due(st, allocated=117 * MiB, now_mono=116) == "growth"
    assert clock.due(st, allocated=None, now_mono=116) is None, "an unreadable image is no growth"


def test_timer_and_operator() -> None:
    st = DiskReconcile(asked_mono=100, allocated_at_last=0)
    assert clock.due(st, allocated=0, now_mono=3699) is None
    assert clock.due(st, allocated=0, now_mono=3700) == "timer"
    st.wanted = "operator"
    assert clock.due(st, allocated=0, now_mono=101) == "operator", "the operator is not held by the gap"
    st.wanted = "connect"
    assert clock.due(st, allocated=0, now_mono=101) is None
    assert clock.due(st, allocated=0, now_mono=116) == "connect"
