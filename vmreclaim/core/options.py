"""The base of every driver's options model (pydantic).

Kept apart from :mod:`vmreclaim.core.driver` so that drivers which take no options —
the format drivers on the path of ``vmreclaim image map`` — never import pydantic: a
short command's start-up time is most of its run time.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: Defaults of the bound on waiting (:class:`PolicyOptions`): a deletion comes back
#: within five minutes, or at once when a gibibyte of them waits.
DEFAULT_MAX_DELAY_SECONDS = 300.0
DEFAULT_MAX_PENDING_BYTES = 1 << 30


class DriverOptions(BaseModel):
    """Base of every driver's options model: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(DriverOptions):
    """The options model of a driver that takes none."""


class PolicyOptions(DriverOptions):
    """Options every policy takes: the bound on how long pending bytes may wait.

    Pending bytes whose oldest record is ``max_delay_seconds`` old, or that add up to
    ``max_pending_bytes``, are reclaimed whatever the driver's own rule says; ``null``
    turns a bound off. Policy drivers derive their options from this model.
    """

    max_delay_seconds: float | None = Field(default=DEFAULT_MAX_DELAY_SECONDS, gt=0)
    max_pending_bytes: int | None = Field(default=DEFAULT_MAX_PENDING_BYTES, gt=0)
