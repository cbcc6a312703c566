"""The hypervisor plugin kind: which VMs exist, their disks, state and channels.

A hypervisor driver (entry-point group ``vmreclaim.hypervisors``) subclasses
:class:`Hypervisor`. It is the source design's parser (module 33): it maps a VM to its
image files and their sizes, and it tells the host daemon what the safety model needs
to know before a live punch — is the VM running, does the disk pass discards, is a
block job (mirror, stream, commit, backup) running on it (DESIGN.md section 4, rule 4).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from vmreclaim.core.driver import Driver, DriverOptions
from vmreclaim.core.model import Disk, VMIdentity


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
class HypervisorCapabilities:
    """Optional abilities of a hypervisor driver; checked by the core, never probed."""

    #: :meth:`Hypervisor.block_jobs` reports real block jobs. Without it the daemon
    #: cannot prove a disk is idle and must not punch it while the VM runs.
    block_jobs: bool = False
    #: :meth:`Hypervisor.refresh` is cheap enough to call before every reclaim.
    live_state: bool = True


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

    def close(self) -> None:
        """Release connections to the hypervisor."""
