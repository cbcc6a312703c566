"""The policy plugin kind: whether and when a disk's pending ranges are reclaimed.

A policy driver (entry-point group ``vmreclaim.policies``) subclasses :class:`Policy`.
The host daemon asks it about each disk with pending deletions (:meth:`Policy.decide`)
and tells it what every reclaim freed and how full the host storage is afterwards
(:meth:`Policy.feedback`). Its state is a JSON-able dict the daemon persists in the
deletion database and shows in ``vmreclaim status``.

Every policy also has a bound on waiting (:class:`PolicyOptions`, checked by
:meth:`Policy.overdue` before :meth:`Policy.decide` is asked): pending bytes older than
``max_delay_seconds``, or more than ``max_pending_bytes`` of them, are reclaimed whatever
the driver's own rule says. A rule that compares ratios (the threshold policy) would
otherwise let a small deletion on a large image wait for ever.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from vmreclaim.core.driver import Driver

if TYPE_CHECKING:
    from vmreclaim.core.driver import DriverOptions


@dataclass(frozen=True)
class StorageState:
    """Usage of the host filesystem holding an image (``statvfs``)."""

    total_bytes: int
    free_bytes: int

    @property
    def used_fraction(self) -> float:
        if self.total_bytes <= 0:
            return 0.0
        return (self.total_bytes - self.free_bytes) / self.total_bytes

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> StorageState:
        st = os.statvfs(path)
        return cls(total_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize)


@dataclass(frozen=True)
class DiskState:
    """What a policy knows of one disk when it decides."""

    key: str
    #: Size of the image file in bytes (the patent's "image size"; ``st_size``).
    image_size: int
    pending_bytes: int
    #: Unix time of the last reclaim of this disk, or ``None`` if never.
    last_reclaim: float | None = None
    #: Unix time the oldest pending record of this disk was received, or ``None``.
    oldest_pending: float | None = None


@dataclass(frozen=True)
class Decision:
    """A policy's answer: reclaim now or not, and the sentence that explains why."""

    reclaim: bool
    reason: str


def _policy_options() -> type[DriverOptions]:
    # Imported on first use: pydantic stays off the import path of ``vmreclaim.core``.
    from vmreclaim.core.options import PolicyOptions

    return PolicyOptions


class _PolicyOptionsByDefault:
    """``Policy.Options`` until a driver sets its own model: :class:`PolicyOptions`."""

    def __get__(self, instance: object, owner: type) -> type[DriverOptions]:
        return _policy_options()


class Policy(Driver):
    """Base class of policy drivers.

    A driver's ``Options`` model derives from
    :class:`vmreclaim.core.options.PolicyOptions` so that its YAML block takes the bound
    on waiting (``max_delay_seconds``, ``max_pending_bytes``); a driver whose model does
    not has no bound.
    """

    kind = "policies"
    Options: ClassVar[type[DriverOptions]] = _PolicyOptionsByDefault()  # type: ignore[assignment]

    def overdue(self, disk: DiskState, now: float) -> Decision | None:
        """A decision to reclaim when ``disk`` has waited past the bound, else ``None``.

        Asked by the pipeline before :meth:`decide`; drivers do not override it.
        """
        if disk.pending_bytes <= 0:
            return None
        # A third-party driver whose options do not derive from PolicyOptions has no bound.
        max_delay = getattr(self.options, "max_delay_seconds", None)
        max_bytes = getattr(self.options, "max_pending_bytes", None)
        if max_bytes is not None and disk.pending_bytes >= max_bytes:
            reason = f"{disk.pending_bytes} bytes pending, at least max_pending_bytes {max_bytes}"
            return Decision(True, reason)
        if max_delay is not None and disk.oldest_pending is not None:
            waited = now - disk.oldest_pending
            if waited >= max_delay:
                reason = f"oldest pending record waited {waited:.0f}s, max_delay_seconds {max_delay:g}"
                return Decision(True, reason)
        return None

    @abstractmethod
    def decide(self, disk: DiskState, storage: StorageState, now: float) -> Decision:
        """Whether ``disk``'s pending ranges should be reclaimed now.

        Called by the host daemon after each stored record and on a periodic tick, for
        every disk with pending bytes. ``storage`` is read just before the call, so the
        policy can re-evaluate its threshold before each reclaim.
        """

    def feedback(self, disk: DiskState, freed_bytes: int, storage: StorageState, now: float) -> None:
        """Learn from a finished reclaim: bytes freed and host storage afterwards."""

    def state(self) -> dict[str, Any]:
        """JSON-able state shown by ``vmreclaim status`` and persisted by the daemon."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back a state returned earlier by :meth:`state` (after a restart)."""
