"""Policy ``threshold``: the source design's adaptive rule (DESIGN.md section 2, module 34).

A disk is reclaimed when ``pending_bytes / image_size`` exceeds a threshold. The
threshold starts at the used fraction of the host filesystem (or ``initial``), rises
linearly as usage rises and halves when usage falls; it is re-evaluated against the
current host usage before every decision and after every reclaim.

Choices the source leaves open, and why:

* ``slope`` (default 1.0): the threshold rises by ``slope`` times the rise of the used
  fraction, so with the default it tracks usage point for point, as the patent's
  "starts at the used fraction, rises linearly" reads.
* ``dead_band`` (default 0.001, i.e. 0.1 % of the host filesystem): usage moves by a
  few blocks all the time; without a band every tiny dip would halve the threshold
  and it would collapse to the floor within minutes. Changes inside the band are
  accumulated until they leave it.
* ``floor`` (default 0.0001): halving repeatedly tends to zero, which would fence a VM
  for every deleted block; the floor keeps at least 0.01 % of the image per reclaim.
* ``ceiling`` (default 0.5): a rising threshold on a filling host would otherwise reach
  1.0 and stop reclaiming exactly when space matters most; at most half an image may
  be garbage before it is reclaimed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from vmreclaim.core.options import PolicyOptions
from vmreclaim.core.policies import Decision, DiskState, Policy, StorageState


class ThresholdOptions(PolicyOptions):
    initial: float | None = Field(default=None, ge=0.0, le=1.0)
    slope: float = Field(default=1.0, ge=0.0)
    fall_factor: float = Field(default=0.5, gt=0.0, lt=1.0)
    dead_band: float = Field(default=0.001, ge=0.0, lt=1.0)
    floor: float = Field(default=0.0001, ge=0.0, le=1.0)
    ceiling: float = Field(default=0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> ThresholdOptions:
        if self.floor > self.ceiling:
            raise ValueError(f"floor {self.floor} is above ceiling {self.ceiling}")
        return self


@dataclass(frozen=True)
class ThresholdState:
    """The rule's whole state: the threshold and the usage it was last moved at."""

    threshold: float
    usage: float


def start_state(options: ThresholdOptions, usage: float) -> ThresholdState:
    """The state before any sample: ``initial`` or the current used fraction."""
    first = options.initial if options.initial is not None else usage
    return ThresholdState(_clamp(first, options), usage)


def next_state(state: ThresholdState, usage: float, options: ThresholdOptions) -> ThresholdState:
    """Apply one usage sample: rise linearly with usage, halve when it falls."""
    delta = usage - state.usage
    if delta > options.dead_band:
        return ThresholdState(_clamp(state.threshold + options.slope * delta, options), usage)
    if delta < -options.dead_band:
        return ThresholdState(_clamp(state.threshold * options.fall_factor, options), usage)
    return state


def _clamp(value: float, options: ThresholdOptions) -> float:
    return min(options.ceiling, max(options.floor, value))


class ThresholdPolicy(Policy):
    """Reclaim a disk when its pending garbage exceeds an adaptive share of its image."""

    Options = ThresholdOptions
    options: ThresholdOptions

    def __init__(self, options: ThresholdOptions | None = None) -> None:
        super().__init__(options)
        self._state: ThresholdState | None = None

    def observe(self, storage: StorageState) -> ThresholdState:
        usage = storage.used_fraction
        if self._state is None:
            self._state = start_state(self.options, usage)
        else:
            self._state = next_state(self._state, usage, self.options)
        return self._state

    def decide(self, disk: DiskState, storage: StorageState, now: float) -> Decision:
        threshold = self.observe(storage).threshold
        if disk.pending_bytes <= 0 or disk.image_size <= 0:
            return Decision(False, "nothing pending")
        ratio = disk.pending_bytes / disk.image_size
        if ratio > threshold:
            return Decision(True, f"pending/image {ratio:.4f} exceeds threshold {threshold:.4f}")
        return Decision(False, f"pending/image {ratio:.4f} within threshold {threshold:.4f}")

    def feedback(self, disk: DiskState, freed_bytes: int, storage: StorageState, now: float) -> None:
        self.observe(storage)

    def state(self) -> dict[str, Any]:
        if self._state is None:
            return {"threshold": None, "usage": None}
        return {"threshold": self._state.threshold, "usage": self._state.usage}

    def restore(self, state: dict[str, Any]) -> None:
        threshold, usage = state.get("threshold"), state.get("usage")
        if isinstance(threshold, int | float) and isinstance(usage, int | float):
            self._state = ThresholdState(_clamp(float(threshold), self.options), float(usage))
