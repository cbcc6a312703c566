"""What every driver of every plugin kind has in common.

A driver is a class registered under a short name in the entry-point group
``vmreclaim.<kind>`` (``format: qcow2`` loads entry point ``qcow2`` of
``vmreclaim.formats``). The loader instantiates it with its validated options, so a
driver keeps its state on the instance. Each kind adds its own abstract methods in its
own module of ``vmreclaim.core`` (``formats``, ``policies``, ...).
"""

from __future__ import annotations

from abc import ABC
from typing import TYPE_CHECKING, Any, ClassVar

#: The driver name that means "probe the installed drivers of this kind and take the
#: one most sure" (``format: auto``, ``--format auto``, the default of both).
AUTO = "auto"

if TYPE_CHECKING:
    from vmreclaim.core.options import DriverOptions as DriverOptions
    from vmreclaim.core.options import NoOptions as NoOptions


def __getattr__(name: str) -> Any:
    # DriverOptions and NoOptions are importable from here, but live in
    # vmreclaim.core.options and are imported on first use: drivers without options
    # then never pay for importing pydantic.
    if name in ("DriverOptions", "NoOptions"):
        from vmreclaim.core import options

        return getattr(options, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _NoOptionsByDefault:
    """``Driver.Options`` until a subclass sets its own model: ``NoOptions``, looked up
    lazily (see the module's ``__getattr__``)."""

    def __get__(self, instance: object, owner: type) -> type[DriverOptions]:
        from vmreclaim.core.options import NoOptions

        return NoOptions


class Driver(ABC):  # noqa: B024 (each kind's subclass adds the abstract methods)
    """Base of every driver class.

    Subclasses set :attr:`Options` to their pydantic model; the config layer validates
    the driver's YAML block against it (unknown keys rejected) and the loader passes
    the result to ``__init__``.
    """

    #: The kind this driver belongs to (``"formats"``, ``"policies"``, ...).
    kind: ClassVar[str] = ""
    #: The options model the YAML block of this driver is validated against.
    Options: ClassVar[type[DriverOptions]] = _NoOptionsByDefault()  # type: ignore[assignment]

    def __init__(self, options: DriverOptions | None = None) -> None:
        self._options = options

    @property
    def options(self) -> DriverOptions:
        """The validated options (the model's defaults when none were given)."""
        if self._options is None:
            self._options = self.Options()
        return self._options
