"""The libvirt driver on libvirt's built-in ``test:///default`` driver (no daemon).

The test driver keeps its state per process, so every test defines domains of its own
with unique names and removes them afterwards.
"""

from __future__ import annotations

import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmreclaim.core import loader
from vmreclaim.core.errors import DriverLoadError, HypervisorError, UsageError
from vmreclaim.core.hypervisors import Hypervisor, VMEvent
from vmreclaim.core.model import Disk, VMIdentity

libvirt = pytest.importorskip("libvirt", reason="needs libvirt-python (the kvm extra)")

from vmreclaim.plugins.hypervisors.libvirt import (  # noqa: E402
    LibvirtHypervisor,
    LibvirtOptions,
    enable_channel,
    parse_channel,
)

pytestmark = pytest.mark.kvm

URI = "test:///default"


def domain_xml(name: str, uid: str, *, channel: bool = True, vsock: bool = False) -> str:
    chan = (
        f"<channel type='unix'><source mode='bind' path='/run/vmr/{name}.sock'/>"
        "<target type='virtio' name='org.vmreclaim.0'/></channel>"
        if channel
        else ""
    )
    other = (
        f"<channel type='unix'><source mode='bind' path='/run/vmr/{name}-ga.sock'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    )
    sock = "<vsock model='virtio'><cid auto='no' address='42'/></vsock>" if vsock else ""
    return f"""<domain type='test'>
  <name>{name}</name><uuid>{uid}</uuid><memory>65536</memory><os><type>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/vmr/{name}-0.qcow2'/><target dev='vda' bus='virtio'/><serial>data0</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='vpc'/>
      <source file='/var/lib/vmr/{name}-1.vhd'/><target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/vg0/{name}'/><target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><source file='/var/lib/vmr/install.iso'/><target dev='sda' bus='sata'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd' name='x'><host name='127.0.0.1' port='10809'/></source>
      <target dev='vdd' bus='virtio'/>
    </disk>
    {other}{chan}{sock}
  </devices>
</domain>"""


@pytest.fixture
def conn() -> Iterator[Any]:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    c = libvirt.open(URI)
    yield c
    c.close()


@pytest.fixture
def domain(conn: Any) -> Iterator[Any]:
    """A persistent, running test domain with four kinds of disk and the channel."""
    name = f"vmr-{uuid.uuid4().hex[:8]}"
    dom = conn.defineXML(domain_xml(name, str(uuid.uuid4())))
    dom.create()
    yield dom
    try:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass  # the test removed it


def driver(**options: Any) -> LibvirtHypervisor:
    options.setdefault("uri", URI)
    cls = loader.driver_class("hypervisors", "libvirt")
    hv = cls(LibvirtOptions(**options))
    assert isinstance(hv, LibvirtHypervisor)
    return hv


def test_registered_as_entry_point() -> None:
    assert loader.driver_class("hypervisors", "libvirt") is LibvirtHypervisor
    assert issubclass(LibvirtHypervisor, Hypervisor)
    caps = LibvirtHypervisor.capabilities
    assert caps.block_jobs and caps.events and caps.discard


def test_disks_formats_discard_serial_target_and_channel(domain: Any) -> None:
    hv = driver(domains=[domain.name()])
    [info] = hv.vms()
    name = domain.name()
    assert info.identity == VMIdentity(name, domain.UUIDString())
    assert info.running is True
    assert info.disks == (
        Disk(name, "data0", Path(f"/var/lib/vmr/{name}-0.qcow2"), "qcow2", True, "data0", "vda"),
        Disk(name, "vdb", Path(f"/var/lib/vmr/{name}-1.vhd"), "vhd", False, None, "vdb"),
        Disk(name, "vdc", Path(f"/dev/vg0/{name}"), "raw", False, None, "vdc"),
    )
    assert info.channel is not None
    # QEMU binds the socket: the host end connects, through the virtio-serial transport.
    assert info.channel.driver == "virtio-serial"
    assert info.channel.options.path == Path(f"/run/vmr/{name}.sock")  # type: ignore[attr-defined]
    assert info.channel.options.name == "org.vmreclaim.0"  # type: ignore[attr-defined]
    hv.close()


def test_vsock_channel_when_there_is_no_port(conn: Any) -> None:
    root = ET.fromstring(domain_xml("x", str(uuid.uuid4()), channel=False, vsock=True))
    found = parse_channel(root)
    assert found is not None and found.kind == "vsock" and found.cid == 42
    root = ET.fromstring(domain_xml("x", str(uuid.uuid4()), channel=False))
    assert parse_channel(root) is None  # the guest agent's channel is not ours


def test_domains_by_name_or_uuid_and_unknown_ones_skipped(conn: Any, domain: Any) -> None:
    by_uuid = driver(domains=[domain.UUIDString(), "no-such-domain"])
    assert [v.identity.name for v in by_uuid.vms()] == [domain.name()]
    everything = driver()
    names = {v.identity.name for v in everything.vms()}
    assert {domain.name(), "test"} <= names


def test_refresh_follows_state_and_undefine(domain: Any) -> None:
    hv = driver(domains=[domain.name()])
    vm = VMIdentity(domain.name(), domain.UUIDString())
    assert hv.refresh(vm).running  # type: ignore[union-attr]
    domain.destroy()
    stopped = hv.refresh(vm)
    assert stopped is not None and stopped.running is False
    domain.undefine()
    assert hv.refresh(vm) is None
    # By name only, too (an identity from a config without a UUID).
    assert hv.refresh(VMIdentity(vm.name)) is None


def test_block_jobs_unknowable_is_reported_as_a_job(domain: Any) -> None:
    """libvirt's test driver cannot report block jobs: the disk must not look idle."""
    hv = driver(domains=[domain.name()])
    [info] = hv.vms()
    jobs = hv.block_jobs(info.identity, info.disks[0])
    assert jobs and all(j.startswith("unknown") for j in jobs)
    domain.destroy()
    assert hv.block_jobs(info.identity, info.disks[0]) == []  # not running: nothing runs


def test_lifecycle_events_are_delivered(conn: Any) -> None:
    name = f"vmr-{uuid.uuid4().hex[:8]}"
    hv = driver(domains=[name])
    got: list[VMEvent] = []
    seen = threading.Event()

    def on_event(ev: VMEvent) -> None:
        got.append(ev)
        if ev.kind == "undefined":
            seen.set()

    hv.watch(on_event)
    other = conn.defineXML(domain_xml(f"other-{name}", str(uuid.uuid4())))
    dom = conn.defineXML(domain_xml(name, str(uuid.uuid4())))
    dom.create()
    dom.destroy()
    dom.undefine()
    other.undefine()
    assert seen.wait(10), f"no undefine event; got {got}"
    assert [e.kind for e in got] == ["defined", "started", "stopped", "undefined"]
    assert {e.vm.name for e in got} == {name}  # the domain not served is filtered out
    hv.close()


def test_libvirt_errors_become_hypervisor_errors() -> None:
    hv = driver(uri="test:///no/such/node.xml")
    with pytest.raises(HypervisorError, match=r"test:///no/such/node\.xml") as err:
        hv.vms()
    assert isinstance(err.value.__cause__, libvirt.libvirtError)


def test_unreadable_domain_xml_becomes_a_hypervisor_error(domain: Any) -> None:
    class Garbled:
        """A domain whose XML is truncated, as from a broken daemon."""

        def __init__(self, real: Any) -> None:
            self.real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def XMLDesc(self, flags: int) -> str:  # libvirt's method name
            return self.real.XMLDesc(flags)[:40]

    hv = driver()
    with pytest.raises(HypervisorError, match="unreadable XML") as err:
        hv._info(Garbled(domain))
    assert isinstance(err.value.__cause__, ET.ParseError)


def test_missing_channel_transport_fails_at_start() -> None:
    with pytest.raises(DriverLoadError, match="no-such-transport"):
        driver(channel_transport="no-such-transport")


# -- vmreclaim libvirt enable ----------------------------------------------------------------


def test_enable_adds_the_channel_to_the_persistent_definition(conn: Any) -> None:
    name = f"vmr-{uuid.uuid4().hex[:8]}"
    dom = conn.defineXML(domain_xml(name, str(uuid.uuid4()), channel=False))
    try:
        dry = enable_channel(URI, name, dry_run=True)
        assert dry.changed and not dry.applied
        assert "+" in dry.diff and "org.vmreclaim.0" in dry.diff
        assert parse_channel(ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))) is None

        done = enable_channel(URI, name)
        assert done.changed and done.applied and done.diff == dry.diff
        found = parse_channel(ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
        assert found is not None and found.kind == "unix"

        again = enable_channel(URI, name)
        assert not again.changed and again.diff == ""
    finally:
        dom.undefine()


def test_enable_refuses_transient_and_unknown_domains(conn: Any) -> None:
    name = f"vmr-{uuid.uuid4().hex[:8]}"
    dom = conn.createXML(domain_xml(name, str(uuid.uuid4()), channel=False), 0)
    try:
        with pytest.raises(UsageError, match="transient"):
            enable_channel(URI, name)
    finally:
        dom.destroy()
    with pytest.raises(UsageError, match="no domain named"):
        enable_channel(URI, "no-such-domain")


def test_cli_enable_prints_the_change(conn: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from vmreclaim.cli import main

    name = f"vmr-{uuid.uuid4().hex[:8]}"
    dom = conn.defineXML(domain_xml(name, str(uuid.uuid4()), channel=False))
    try:
        assert main(["libvirt", "enable", name, "--uri", URI, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "+" in out and "org.vmreclaim.0" in out and "dry run" in out
        assert parse_channel(ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))) is None
        assert main(["libvirt", "enable", name, "--uri", URI, "--path", "/run/vmr/x.sock"]) == 0
        assert "/run/vmr/x.sock" in capsys.readouterr().out
        assert main(["libvirt", "enable", name, "--uri", URI, "--json"]) == 0
        assert '"changed": false' in capsys.readouterr().out
        assert main(["libvirt", "enable", "no-such-domain", "--uri", URI]) == 2
    finally:
        dom.undefine()
