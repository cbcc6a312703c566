"""Hypervisor ``static``: VMs, disks and channels listed in the host's YAML.

Running state is not known from a list, so a VM is treated as running whenever any
process holds QEMU's write lock on one of its images (see :mod:`vmreclaim.core.locks`)
— the conservative answer: a running VM is only ever punched inside a fence.

Block jobs cannot be seen from a list either. A running VM's disks are punched only
when no block job can be running (DESIGN.md section 4, rule 4), so by default the
driver answers "unknown" and the host reclaims such a VM only in guest-trim mode or once
it stops. An operator who knows that nothing runs block jobs on a VM's disks (a
``qemu-storage-daemon`` they control, a hypervisor without block jobs) says so with
``block_jobs: none``; otherwise the ``qemu`` or ``libvirt`` driver can ask the real thing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from vmreclaim.core import loader
from vmreclaim.core.config import StrictModel, TransportConfig
from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.errors import HypervisorError
from vmreclaim.core.hypervisors import ChannelSpec, Hypervisor, HypervisorCapabilities, VMInfo
from vmreclaim.core.locks import busy_reason
from vmreclaim.core.model import Disk, VMIdentity


def _require_unique(values: list[str], rule: str) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{rule}; repeated: {', '.join(repeated)}")


class StaticDisk(StrictModel):
    id: str = Field(min_length=1, max_length=256)
    path: Path
    #: Required, and never ``auto``: probing reads bytes the guest writes, and a qcow2
    #: header planted in a raw disk would name another VM's image as its data file
    #: (DESIGN.md section 4, rule 6). The operator's word is the only source here.
    format: str = Field(description="the image's format driver: raw, qcow2, vhd, ...")
    discard: bool = Field(default=False, description="the hypervisor passes guest discards")
    serial: str | None = None


    @field_validator("format")
    @classmethod
    def _named_format(cls, value: str) -> str:
        if value == "auto":
            raise ValueError(
                "'auto' is refused: a guest can write a qcow2 or VHD header into its own raw disk "
                "and redirect punches; name the format (raw, qcow2, vhd)"
            )
        installed = loader.names("formats")
        if value not in installed:
            raise ValueError(f"no format driver {value!r} is installed; installed: {', '.join(installed)}")
        return value


class StaticVM(StrictModel):
    name: str = Field(min_length=1, max_length=256)
    uuid: str | None = None
    disks: list[StaticDisk] = Field(min_length=1)
    channel: TransportConfig
    #: ``none``: the operator states that no block job (mirror, stream, commit, backup,
    #: snapshot) ever runs on these disks while the VM runs; ``unknown`` (default): the
    #: driver cannot tell, so a running VM is never host-punched.
    block_jobs: Literal["unknown", "none"] = "unknown"

    @field_validator("disks")
    @classmethod
    def _unique_disk_ids(cls, disks: list[StaticDisk]) -> list[StaticDisk]:
        _require_unique([d.id for d in disks], "disk ids must be unique within a VM")
        return disks


class StaticOptions(DriverOptions):
    vms: list[StaticVM] = Field(min_length=1)

    @field_validator("vms")
    @classmethod
    def _unique_names(cls, vms: list[StaticVM]) -> list[StaticVM]:
        _require_unique([v.name for v in vms], "VM names must be unique")
        return vms


class StaticHypervisor(Hypervisor):
    """VMs from the configuration file."""

    # The driver answers for every VM: [] where the operator declared `block_jobs: none`,
    # and an error (which postpones the punch) where it cannot know.
    capabilities: ClassVar[HypervisorCapabilities] = HypervisorCapabilities(block_jobs=True)

    Options = StaticOptions
    options: StaticOptions

    def _info(self, vm: StaticVM) -> VMInfo:
        disks = tuple(
            Disk(
                vm=vm.name,
                id=d.id,
                path=d.path,
                format=d.format,
                passes_discards=d.discard,
                serial=d.serial,
            )
            for d in vm.disks
        )
        return VMInfo(
            identity=VMIdentity(vm.name, vm.uuid),
            running=any(_in_use(d.path) for d in disks),
            disks=disks,
            channel=ChannelSpec(vm.channel.driver, vm.channel.options),
        )

    def vms(self) -> list[VMInfo]:
        return [self._info(vm) for vm in self.options.vms]

    def refresh(self, vm: VMIdentity) -> VMInfo | None:
        found = next((v for v in self.options.vms if v.name == vm.name), None)
        return self._info(found) if found is not None else None

    def block_jobs(self, vm: VMIdentity, disk: Disk) -> list[str]:
        found = next((v for v in self.options.vms if v.name == vm.name), None)
        if found is None:
            raise HypervisorError(f"VM {vm.name!r} is not in the static configuration")
        if found.block_jobs == "none" or not any(_in_use(d.path) for d in found.disks):
            return []  # declared, or no process holds the images: no job can run
        raise HypervisorError(
            f"the static driver cannot report block jobs of VM {vm.name!r}; set "
            "'block_jobs: none' for it if nothing runs them, or use the qemu or libvirt driver"
        )


def _in_use(path: Path) -> bool:
    """True when another process holds a QEMU lock that forbids an offline writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return busy_reason(fd) is not None
    finally:
        os.close(fd)
