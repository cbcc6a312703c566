"""Policies as pure functions over sequences of host-usage samples."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from vmreclaim.core.policies import DiskState, StorageState
from vmreclaim.plugins.policies.always import AlwaysPolicy
from vmreclaim.plugins.policies.threshold import (
    ThresholdOptions,
    ThresholdPolicy,
    ThresholdState,
    next_state,
    start_state,
)
from vmreclaim.plugins.policies.watermark import WatermarkOptions, WatermarkPolicy

GIB = 1 << 30


def storage(used: float) -> StorageState:
    return StorageState(total_bytes=100 * GIB, free_bytes=int(100 * GIB * (1 - used)))


def test_threshold_starts_at_host_usage_or_configured_value() -> None:
    assert start_state(ThresholdOptions(), 0.30).threshold == pytest.approx(0.30)
    assert start_state(ThresholdOptions(initial=0.05), 0.30).threshold == pytest.approx(0.05)


def test_threshold_rises_linearly_and_halves_on_fall() -> None:
    opts = ThresholdOptions(slope=1.0, dead_band=0.0, floor=0.0, ceiling=1.0)
    state = start_state(opts, 0.20)
    trace = []
    for usage in (0.25, 0.30, 0.30, 0.28, 0.35, 0.10):
        state = next_state(state, usage, opts)
        trace.append(round(state.threshold, 6))
    assert trace == [0.25, 0.30, 0.30, 0.15, 0.22, 0.11]


def test_slope_scales_the_rise() -> None:
    opts = ThresholdOptions(slope=2.0, dead_band=0.0, floor=0.0, ceiling=1.0)
    state = next_state(ThresholdState(0.1, 0.5), 0.6, opts)
    assert state.threshold == pytest.approx(0.3)


def test_dead_band_ignores_jitter_but_accumulates_drift() -> None:
    opts = ThresholdOptions(dead_band=0.01, floor=0.0, ceiling=1.0)
    state = ThresholdState(0.4, 0.50)
    for usage in (0.495, 0.505, 0.498):  # jitter inside the band: no halving
        state = next_state(state, usage, opts)
    assert state.threshold == pytest.approx(0.4)
    for usage in (0.505, 0.509, 0.512):  # slow rise leaves the band at 0.512
        state = next_state(state, usage, opts)
    assert state.threshold == pytest.approx(0.412)


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=50))
def test_threshold_stays_between_floor_and_ceiling(samples: list[float]) -> None:
    opts = ThresholdOptions(floor=0.01, ceiling=0.4)
    state = start_state(opts, samples[0])
    for usage in samples[1:]:
        state = next_state(state, usage, opts)
        assert opts.floor <= state.threshold <= opts.ceiling


def test_threshold_policy_decides_on_ratio_and_keeps_state() -> None:
    policy = ThresholdPolicy(ThresholdOptions(initial=0.1))
    disk = DiskState(key="vm1/disk0", image_size=10 * GIB, pending_bytes=GIB // 2)
    assert not policy.decide(disk, storage(0.5), now=0).reclaim  # 0.05 <= 0.1
    big = DiskState(key="vm1/disk0", image_size=10 * GIB, pending_bytes=2 * GIB)
    decision = policy.decide(big, storage(0.5), now=1)
    assert decision.reclaim and "exceeds" in decision.reason
    saved = policy.state()
    again = ThresholdPolicy(ThresholdOptions(initial=0.4))
    again.restore(saved)
    assert again.state() == saved


def test_threshold_options_are_validated() -> None:
    with pytest.raises(ValidationError, match="floor"):
        ThresholdOptions(floor=0.6, ceiling=0.5)
    with pytest.raises(ValidationError, match="Extra inputs"):
        ThresholdOptions.model_validate({"slop": 1})


def test_always_reclaims_anything_pending() -> None:
    policy = AlwaysPolicy()
    assert policy.decide(DiskState("d", 1, 1), storage(0.1), 0).reclaim
    assert not policy.decide(DiskState("d", 1, 0), storage(0.1), 0).reclaim


def test_watermark_batches_hurries_and_rate_limits() -> None:
    policy = WatermarkPolicy(WatermarkOptions(batch_bytes=100, high_watermark=0.9, min_interval_seconds=60))
    small = DiskState("d", 1000, 10, last_reclaim=None)
    assert not policy.decide(small, storage(0.5), now=1000).reclaim
    assert policy.decide(small, storage(0.95), now=1000).reclaim  # above the watermark
    full = DiskState("d", 1000, 150, last_reclaim=990)
    limited = policy.decide(full, storage(0.95), now=1000)
    assert not limited.reclaim and "ago" in limited.reason
    assert policy.decide(DiskState("d", 1000, 150, last_reclaim=900), storage(0.5), now=1000).reclaim
