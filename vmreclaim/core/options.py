"""The base of every driver's options model (pydantic).

Kept apart from :mod:`vmreclaim.core.driver` so that drivers which take no options —
the format drivers on the path of ``vmreclaim image map`` — never import pydantic: a
short command's start-up time is most of its run time.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class DriverOptions(BaseModel):
    """Base of every driver's options model: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(DriverOptions):
    """The options model of a driver that takes none."""
