"""Following the hypervisor: VMs that appear get a listener, VMs that go lose theirs,
and their pending records wait in the database for them."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import ClassVar

from hosttest import MiB, Site, eventually, running

from vmreclaim.core.hypervisors import HypervisorCapabilities, VMEvent, VMEventCallback, VMInfo
from vmreclaim.core.model import VMIdentity
from vmreclaim.plugins.hypervisors.static import StaticHypervisor
from vmreclaim.testing.host import AgentPeer

HOLD = {"driver": "watermark", "batch_bytes": 2**60, "high_watermark": 1.0}


class Changing(StaticHypervisor):
    """The static driver with a list of VMs a test changes, announcing each change as a
    hypervisor with events would (a test double of libvirt's lifecycle events)."""

    capabilities: ClassVar[HypervisorCapabilities] = HypervisorCapabilities(events=True)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.present = {v.identity.name: v for v in super().vms()}
        self.callback: VMEventCallback | None = None

    def vms(self) -> list[VMInfo]:
        return list(self.present.values())

    def refresh(self, vm: VMIdentity) -> VMInfo | None:
        return self.present.get(vm.name)

    def watch(self, callback: VMEventCallback) -> None:
        self.callback = callback

    def announce(self, name: str, kind: str) -> None:
        assert self.callback is not None, "the daemon did not watch for events"
        self.callback(VMEvent(VMIdentity(name), kind))


def test_vms_that_come_and_go(site: Site) -> None:
    site.add_vm("vm1", [{"id": "disk0", "path": site.raw_disk("vm1.raw"), "format": "raw"}])
    site.add_vm("vm2", [{"id": "disk0", "path": site.raw_disk("vm2.raw"), "format": "raw"}])
    config = site.config(policy=HOLD, reclaim={"rescan_seconds": 3600})
    hv = Changing(config.hypervisor.options)
    vm2 = hv.present.pop("vm2")

    async def main() -> None:
        async with running(config, hypervisor=hv) as daemon:
            assert set(daemon.vms) == {"vm1"}
            one = AgentPeer(site.channel("vm1"))
            await one.connect()
            seq = await one.send_record([(0, MiB)])
            await one.wait_answered(seq)
            # vm2 is defined and started: its channel opens without waiting for a rescan.
            hv.present["vm2"] = vm2
            hv.announce("vm2", "started")
            two = AgentPeer(site.channel("vm2"))
            assert (await two.connect(timeout=10)) is not None
            assert two.welcome is not None and two.welcome.vm == "vm2"
            # vm1 goes: its agent is let go, its channel closed, its records kept.
            del hv.present["vm1"]
            hv.announce("vm1", "undefined")
            await asyncio.wait_for(one.closed.wait(), 10)
            await eventually(lambda: not site.channel("vm1").exists(), what="vm1's socket removed")
            doc = await daemon.status_document()
            assert [v["name"] for v in doc["vms"]] == ["vm2"]
            assert doc["orphaned"] == {"vm1/disk0": MiB}
            # It comes back (with a new disk path, say): its records are its own again.
            hv.present["vm1"] = dataclasses.replace(
                vm2,
                identity=VMIdentity("vm1"),
                disks=tuple(dataclasses.replace(d, vm="vm1") for d in vm2.disks),
                channel=dataclasses.replace(
                    vm2.channel, options=vm2.channel.options.model_copy(update={"path": site.channel("vm1")})
                )
                if vm2.channel
                else None,
            )
            hv.announce("vm1", "defined")
            await eventually(lambda: "vm1" in daemon.vms and daemon.disks["vm1/disk0"].pending.records == 1)
            assert (await daemon.status_document())["orphaned"] == {}
            await two.close()

    asyncio.run(main())
