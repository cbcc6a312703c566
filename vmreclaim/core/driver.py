"""What every driver of every plugin kind has in common.

A driver is a class registered under a short name in the entry-point group
``vmreclaim.<kind>`` (``format: qcow2`` loads entry point ``qcow2`` of
``vmreclaim.formats``). The loader instantiates it with its validated options, so a
driver keeps its state on the instance. Each kind adds its own abstract methods in its
own module of ``vmreclaim.core`` (``formats``, ``policies``, ...).
"""

from __future__ import annotations

from abc import ABC
from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class DriverOptions(BaseModel):
    """Base of every driver's options model: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(DriverOptions):
    """The options model of a driver that takes none."""


class Driver(ABC):  # noqa: B024 (each kind's subclass adds the abstract methods)
    """Base of every driver class.

    Subclasses set :attr:`Options` to their pydantic model; the config layer validates
    the driver's YAML block against it (unknown keys rejected) and the loader passes
    the result to ``__init__``.
    """

    #: The kind this driver belongs to (``"formats"``, ``"policies"``, ...).
    kind: ClassVar[str] = ""
    #: The options model the YAML block of this driver is validated against.
    Options: ClassVar[type[DriverOptions]] = NoOptions

    def __init__(self, options: DriverOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()
