"""The policy plugin kind: whether and when a disk's pending ranges are reclaimed.

A policy driver (entry-point group ``vmreclaim.policies``) subclasses :class:`Policy`.
The host daemon asks it about each disk with pending deletions (:meth:`Policy.decide`)
and tells it what every reclaim freed and how full the host storage is afterwards
(:meth:`Policy.feedback`). Its state is a JSON-able dict the daemon persists in the
deletion database and shows in ``vmreclaim status``.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from vmreclaim.core.driver import Driver


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


@dataclass(frozen=True)
class Decision:
    """A policy's answer: reclaim now or not, and the sentence that explains why."""

    reclaim: bool
    reason: str


class Policy(Driver):
    """Base class of policy drivers."""

    kind = "policies"

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
