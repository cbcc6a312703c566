"""The hypervisor plugin kind: which VMs exist, their disks, state and channels.

A hypervisor driver (entry-point group ``vmreclaim.hypervisors``) subclasses
:class:`Hypervisor`. It is the source design's parser (module 33): it maps a VM to its
image files and their sizes, and it tells the host daemon what the safety model needs
to know before a live punch — is the VM running, does the disk pass discards, is a
block job (mirror, stream, commit, backup) running on it (DESIGN.md section 4, rule 4).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from vmreclaim.core import loader
from vmreclaim.core.driver import Driver, DriverOptions
from vmreclaim.core.errors import DriverError, DriverLoadError, HypervisorError
from vmreclaim.core.model import Disk, VMIdentity
from vmreclaim.core.ranges import RangeSet


@dataclass(frozen=True)
class ChannelSpec:
    """The transport driver and options of one VM's channel, as the host must open it."""

    driver: str
    options: DriverOptions


@dataclass(frozen=True)
class VMInfo:
    """One VM as its hypervisor describes it."""

    identity: VMIdentity
    running: bool
    disks: tuple[Disk, ...] = ()
    channel: ChannelSpec | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def disk(self, disk_id: str) -> Disk | None:
        return next((d for d in self.disks if d.id == disk_id), None)


@dataclass(frozen=True)
class VMEvent:
    """A change of one VM that the hypervisor announced (capability ``events``).

    ``kind`` is one of :data:`VM_EVENT_KINDS`; ``detail`` is the hypervisor's own word
    for why (``"booted"``, ``"shutdown"``, ``"destroyed"``), for logs only.
    """

    vm: VMIdentity
    kind: str
    detail: str = ""


#: ``started`` / ``stopped``: the VM began or ceased running (its channel appears or
#: goes; a stopped VM may be reclaimed offline). ``defined`` / ``undefined``: the VM
#: was added to or removed from the hypervisor. ``changed``: anything else (paused,
#: resumed, a device added) — list the VM again.
VM_EVENT_KINDS = ("started", "stopped", "defined", "undefined", "changed")

#: Called by :meth:`Hypervisor.watch` from a thread of the driver's own.
VMEventCallback = Callable[[VMEvent], None]


@dataclass(frozen=True)
class HypervisorCapabilities:
    """Optional abilities of a hypervisor driver; checked by the core, never probed."""

    #: :meth:`Hypervisor.block_jobs` reports real block jobs. Without it the daemon
    #: cannot prove a disk is idle and must not punch it while the VM runs.
    block_jobs: bool = False
    #: :meth:`Hypervisor.refresh` is cheap enough to call before every reclaim.
    live_state: bool = True
    #: :meth:`Hypervisor.watch` delivers VM start/stop/define/undefine events, so the
    #: daemon need not wait for its next rescan to follow them.
    events: bool = False
    #: :meth:`Hypervisor.discard` sends discards through the hypervisor's own block
    #: layer (QEMU), which also releases qcow2 clusters in the image's metadata.
    discard: bool = False


def channel_options_model(transport: str, who: str) -> type[DriverOptions]:
    """The options model of transport driver ``transport``, with which a hypervisor
    driver validates the :class:`ChannelSpec` options it derives for its VMs.

    A transport that is not installed (or fails to load) is a
    :class:`~vmreclaim.core.errors.DriverLoadError` naming ``who`` needed it.
    """
    try:
        return loader.driver_class("transports", transport).Options
    except DriverError as exc:
        raise DriverLoadError(f"{who}: channel transport: {exc}") from exc


class Hypervisor(Driver):
    """Base class of hypervisor drivers."""

    kind = "hypervisors"
    capabilities: ClassVar[HypervisorCapabilities] = HypervisorCapabilities()

    @abstractmethod
    def vms(self) -> list[VMInfo]:
        """Every VM this host daemon serves, with disks and channel.

        Raise :class:`~vmreclaim.core.errors.HypervisorError` if the hypervisor cannot
        be asked.
        """

    @abstractmethod
    def refresh(self, vm: VMIdentity) -> VMInfo | None:
        """The current description of ``vm`` (running state, disks), or ``None`` if it
        no longer exists. Called before every reclaim of one of its disks."""

    def block_jobs(self, vm: VMIdentity, disk: Disk) -> list[str]:
        """Names of block jobs running on ``disk`` (capability ``block_jobs``)."""
        return []

    def watch(self, callback: VMEventCallback) -> None:
        """Deliver every later :class:`VMEvent` to ``callback`` (capability ``events``).

        The callback runs in a thread of the driver's own and must not block (an
        asyncio daemon hands the event to its loop with ``call_soon_threadsafe``). It
        is only a hint to list VMs again: the daemon still rescans periodically, and
        drivers without the capability never call it.
        """

    def discard(self, vm: VMIdentity, disk: Disk, ranges: RangeSet) -> None:
        """Discard guest byte ``ranges`` of ``disk`` through the hypervisor's block layer
        (capability ``discard``): the deep reclaim of a live qcow2 image.

        Only for ranges proven free under a fence that is still up (DESIGN.md section 4):
        the guest does not see this discard coming. Raise
        :class:`~vmreclaim.core.errors.HypervisorError` when it cannot be done.
        """
        name = type(self).__name__
        raise HypervisorError(f"hypervisor driver {name} cannot discard through its hypervisor")

    def close(self) -> None:
        """Release connections to the hypervisor (and stop delivering events)."""
