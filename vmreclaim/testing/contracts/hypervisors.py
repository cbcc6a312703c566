"""The hypervisor contract: what the host daemon relies on from every hypervisor
driver, each against its real backend.

Subclass :class:`HypervisorContract` as ``Test<Something>``, set ``driver`` and
implement the ``hypervisor`` fixture: a loaded driver that sees at least one VM with at
least one disk (and is closed, with its backend, after the test)::

    class TestMine(HypervisorContract):
        driver = "mine"

        @pytest.fixture
        def hypervisor(self, tmp_path):
            ...  # start or reach the backend, define a VM
            hv = loader.load_driver("hypervisors", "mine", Hypervisor, options)
            yield hv
            hv.close()
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from vmreclaim.core import loader
from vmreclaim.core.errors import HypervisorError
from vmreclaim.core.hypervisors import Hypervisor, VMInfo
from vmreclaim.core.model import VMIdentity
from vmreclaim.core.ranges import RangeSet


class HypervisorContract:
    """Every hypervisor driver: registered under its name, VMs with disks of their own,
    ``refresh`` agreeing with ``vms``, and capabilities that are true (an operation the
    driver says it cannot do raises :class:`HypervisorError`)."""

    #: The driver's entry-point name in ``vmreclaim.hypervisors``.
    driver: ClassVar[str]

    def test_driver_is_a_registered_hypervisor(self, hypervisor: Hypervisor) -> None:
        installed = {d.name: d for d in loader.installed("hypervisors")}
        assert installed[self.driver].error is None
        assert loader.driver_class("hypervisors", self.driver) is type(hypervisor)

    def test_vms_describe_disks_of_their_own(self, hypervisor: Hypervisor) -> None:
        infos = hypervisor.vms()
        assert infos and all(isinstance(i, VMInfo) for i in infos)
        for info in infos:
            ids = [d.id for d in info.disks]
            assert len(ids) == len(set(ids)), f"disk ids of {info.identity} repeat: {ids}"
            for disk in info.disks:
                assert disk.vm == info.identity.name
                assert disk.path.is_absolute()
                assert disk.format and disk.format != "vpc"  # QEMU's name for VHD is mapped
                assert isinstance(hypervisor.block_jobs(info.identity, disk), list)

    def test_refresh_is_consistent_with_vms(self, hypervisor: Hypervisor) -> None:
        for info in hypervisor.vms():
            again = hypervisor.refresh(info.identity)
            assert again is not None
            assert again.identity.name == info.identity.name
            assert [d.id for d in again.disks] == [d.id for d in info.disks]
        assert hypervisor.refresh(VMIdentity("no-such-vm-anywhere")) is None

    def test_capabilities_are_honest(self, hypervisor: Hypervisor) -> None:
        caps = type(hypervisor).capabilities
        got: list[Any] = []
        if caps.events:
            hypervisor.watch(got.append)  # must start without error
        if not caps.discard:
            info = hypervisor.vms()[0]
            with pytest.raises(HypervisorError):
                hypervisor.discard(info.identity, info.disks[0], RangeSet.from_ranges([(0, 4096)]))
