"""Policies as pure functions over sequences of host-usage samples."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from vmreclaim import hookimpl
from vmreclaim.core.options import DEFAULT_MAX_DELAY_SECONDS, DEFAULT_MAX_PENDING_BYTES, PolicyOptions
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.plugins import Plugins
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
from vmreclaim.testing import make_disk

GIB = 1 << 30
MIB = 1 << 20


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


# -- the bound on waiting (every policy) --------------------------------------------------


@pytest.mark.parametrize("policy", [ThresholdPolicy(), WatermarkPolicy(), AlwaysPolicy()])
def test_every_shipped_policy_takes_the_bound_on_waiting(policy: Any) -> None:
    assert policy.options.max_delay_seconds == DEFAULT_MAX_DELAY_SECONDS
    assert policy.options.max_pending_bytes == DEFAULT_MAX_PENDING_BYTES


def test_a_small_deletion_on_a_large_image_waits_no_longer_than_the_bound() -> None:
    # The case seen on a real VM: 256 MiB pending on a 1.3 GiB image, the threshold at
    # its 0.5 ceiling with the host 76 % full — the ratio alone would wait for ever.
    policy = ThresholdPolicy(ThresholdOptions(max_delay_seconds=600, max_pending_bytes=None))
    pipeline = Pipeline()
    disk = make_disk("/dev/null")
    fresh = DiskState("d", 1300 * MIB, 256 * MIB, oldest_pending=1000.0)
    decision = pipeline.decide(disk, policy, fresh, storage(0.76), now=1599.0)
    assert not decision.reclaim and "within threshold" in decision.reason
    decision = pipeline.decide(disk, policy, fresh, storage(0.76), now=1600.0)
    assert decision.reclaim and "max_delay_seconds 600" in decision.reason


def test_many_pending_bytes_are_reclaimed_whatever_the_ratio() -> None:
    policy = ThresholdPolicy(ThresholdOptions(initial=0.5, max_pending_bytes=64 * MIB))
    state = DiskState("d", 100 * GIB, 64 * MIB, oldest_pending=0.0)
    decision = Pipeline().decide(make_disk("/dev/null"), policy, state, storage(0.5), now=1.0)
    assert decision.reclaim and "max_pending_bytes" in decision.reason
    nothing = DiskState("d", 100 * GIB, 0)
    assert not Pipeline().decide(make_disk("/dev/null"), policy, nothing, storage(0.5), 1e9).reclaim


def test_the_bound_can_be_turned_off_and_a_veto_still_applies() -> None:
    policy = ThresholdPolicy(ThresholdOptions(max_delay_seconds=None, max_pending_bytes=None))
    state = DiskState("d", 100 * GIB, 1, oldest_pending=0.0)
    assert not Pipeline().decide(make_disk("/dev/null"), policy, state, storage(0.5), now=1e9).reclaim

    class Pause:
        @hookimpl
        def vmreclaim_decide_veto(self, disk: Any, pending_bytes: int, decision: Any) -> str:
            return "backup window"

    plugins = Plugins()
    plugins.register(Pause(), "pause")
    overdue = ThresholdPolicy(ThresholdOptions(max_delay_seconds=1))
    decision = Pipeline(plugins).decide(make_disk("/dev/null"), overdue, state, storage(0.5), now=1e9)
    assert not decision.reclaim and "backup window" in decision.reason


def test_watermark_interval_may_not_exceed_the_bound() -> None:
    with pytest.raises(ValidationError, match="min_interval_seconds 900 is above max_delay_seconds 300"):
        WatermarkOptions(min_interval_seconds=900)
    WatermarkOptions(min_interval_seconds=900, max_delay_seconds=None)


def test_unknown_keys_in_a_policy_block_are_still_errors() -> None:
    with pytest.raises(ValidationError):
        PolicyOptions(max_delay=5)  # type: ignore[call-arg]
