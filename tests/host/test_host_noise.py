"""A healthy host is quiet (issue 21 item 3): a guest that has not said hello yet is
waited for, not rejected; a VM without a channel (shut off) is logged once per change
of state; ``rejected_records`` counts only hostile or malformed input."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import ClassVar

import pytest
from hosttest import Site, eventually, running

from vmreclaim.core.hypervisors import VMInfo
from vmreclaim.core.model import VMIdentity
from vmreclaim.host import session as session_module
from vmreclaim.plugins.hypervisors.static import StaticHypervisor
from vmreclaim.testing.host import AgentPeer


def named(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


def test_a_silent_guest_is_waited_for_not_rejected(
    site: Site, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = site.raw_disk("vm1.raw")
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    monkeypatch.setattr(session_module, "HELLO_TIMEOUT", 0.2)
    caplog.set_level(logging.DEBUG, logger="vmreclaim.host")

    async def main() -> None:
        async with running(site.config()) as daemon:
            await eventually(channel.exists)
            # The channel is up, the guest says nothing (it is booting) ...
            reader, writer = await asyncio.open_unix_connection(str(channel))
            await asyncio.sleep(1.0)
            assert not reader.at_eof(), "the host hung up on a guest that had not spoken yet"
            assert daemon.rejected_total == 0
            writer.close()
            # ... and a guest that then boots is served on its next connection.
            async with AgentPeer(channel) as peer:
                assert peer.welcome is not None
            assert daemon.rejected_total == 0

    asyncio.run(main())
    assert not named(caplog, "record.rejected")
    assert len(named(caplog, "agent.waiting_for_hello")) == 1


def test_malformed_hello_still_counts_as_rejected(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    image = site.raw_disk("vm1.raw")
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])

    async def main() -> None:
        async with running(site.config()) as daemon:
            await eventually(channel.exists)
            reader, writer = await asyncio.open_unix_connection(str(channel))
            writer.write(b'{"type": "record", "v": 1}\n')
            await writer.drain()
            await asyncio.wait_for(reader.read(), 10)  # the host answers error and hangs up
            writer.close()
            await eventually(lambda: daemon.rejected_total == 1)

    asyncio.run(main())
    (rejected,) = named(caplog, "record.rejected")
    assert rejected.levelno == logging.WARNING


class SwitchingHypervisor(StaticHypervisor):
    """The static driver, but the VM's channel comes and goes like a libvirt domain's
    (its socket path is in the live XML only while it runs): a test double."""

    running: ClassVar[bool] = False

    def refresh(self, vm: VMIdentity) -> VMInfo | None:
        return self._switch(super().refresh(vm))

    def vms(self) -> list[VMInfo]:
        return [i for i in (self._switch(v) for v in super().vms()) if i is not None]

    def _switch(self, info: VMInfo | None) -> VMInfo | None:
        if info is None or self.running:
            return info
        return dataclasses.replace(info, running=False, channel=None)


def test_no_channel_is_logged_once_per_change_of_state(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    image = site.raw_disk("vm1.raw")
    site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    config = site.config(reclaim={"tick_seconds": 0.2, "rescan_seconds": 0.05})
    hv = SwitchingHypervisor(config.hypervisor.options)
    SwitchingHypervisor.running = False
    caplog.set_level(logging.INFO, logger="vmreclaim.host")

    async def main() -> None:
        async with running(config, hypervisor=hv):
            await asyncio.sleep(0.6)  # a dozen rescans of a shut-off VM
            assert len(named(caplog, "vm.no_channel")) == 1
            SwitchingHypervisor.running = True
            await eventually(lambda: len(named(caplog, "channel.listening")) == 1)
            await asyncio.sleep(0.3)
            SwitchingHypervisor.running = False
            await asyncio.sleep(0.6)

    asyncio.run(main())
    records = named(caplog, "vm.no_channel")
    assert len(records) == 2  # shut off at start, shut off again: two changes
    assert all(r.levelno == logging.INFO for r in records)  # a stopped VM is not a fault
