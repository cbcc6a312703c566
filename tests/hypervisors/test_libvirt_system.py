"""The libvirt driver against a real libvirtd with real transient QEMU (TCG) domains.

The domains boot no OS (the firmware finds nothing to boot and waits): disks, channels,
block jobs, events and QEMU's own discard do not need one.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmreclaim.core.hypervisors import VMEvent
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing import run
from vmreclaim.testing.guest import allocated_bytes

libvirt = pytest.importorskip("libvirt", reason="needs libvirt-python (the kvm extra)")

from vmreclaim.plugins.hypervisors.libvirt import LibvirtHypervisor, LibvirtOptions  # noqa: E402

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.qemu]

MiB = 1024 * 1024


def qemu_domain_xml(name: str, image: Path, socket: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{image}'/><target dev='vda' bus='virtio'/><serial>data0</serial>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='{socket}'/><target type='virtio' name='org.vmreclaim.0'/>
    </channel>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"""


@pytest.fixture
def qemu_domain(system_uri: str, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """A running transient QEMU domain whose qcow2 holds 2 MiB of data at 1 MiB."""
    image = tmp_path / "d0.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(image)])
    conn = libvirt.open(system_uri)
    name = f"vmr-{uuid.uuid4().hex[:8]}"
    dom = conn.createXML(qemu_domain_xml(name, image, tmp_path / "ch.sock"), 0)
    try:
        yield dom, image
    finally:
        with contextlib.suppress(libvirt.libvirtError):  # already gone
            dom.destroy()
        conn.close()


def driver(uri: str, name: str, **options: Any) -> LibvirtHypervisor:
    return LibvirtHypervisor(LibvirtOptions(uri=uri, domains=[name], **options))


def test_live_domain_disks_and_channel_path(
    system_uri: str, qemu_domain: tuple[Any, Path], tmp_path: Path
) -> None:
    dom, image = qemu_domain
    hv = driver(system_uri, dom.name())
    [info] = hv.vms()
    assert info.running
    [disk] = info.disks
    assert (disk.id, disk.path, disk.format, disk.passes_discards, disk.target) == (
        "data0", image, "qcow2", True, "vda",
    )  # fmt: skip
    assert info.channel is not None
    assert info.channel.driver == "virtio-serial"
    assert info.channel.options.path == tmp_path / "ch.sock"  # type: ignore[attr-defined]
    assert (tmp_path / "ch.sock").is_socket()  # QEMU bound it: the host end must connect
    assert hv.block_jobs(info.identity, disk) == []
    hv.close()


def test_block_copy_is_reported_until_aborted(
    system_uri: str, qemu_domain: tuple[Any, Path], tmp_path: Path
) -> None:
    dom, _ = qemu_domain
    hv = driver(system_uri, dom.name())
    [info] = hv.vms()
    dest = tmp_path / "copy.qcow2"
    dom.blockCopy("vda", f"<disk type='file'><driver type='qcow2'/><source file='{dest}'/></disk>", None, 0)
    try:
        assert hv.block_jobs(info.identity, info.disks[0]) == ["copy on vda"]
    finally:
        dom.blockJobAbort("vda", 0)
    for _ in range(100):
        if not hv.block_jobs(info.identity, info.disks[0]):
            break
    assert hv.block_jobs(info.identity, info.disks[0]) == []


def test_start_and_stop_events_of_a_real_domain(system_uri: str, tmp_path: Path) -> None:
    image = tmp_path / "e.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"])
    name = f"vmr-{uuid.uuid4().hex[:8]}"
    hv = driver(system_uri, name)
    got: list[VMEvent] = []
    stopped = threading.Event()

    def on_event(ev: VMEvent) -> None:
        got.append(ev)
        if ev.kind == "stopped":
            stopped.set()

    hv.watch(on_event)
    conn = libvirt.open(system_uri)
    try:
        dom = conn.createXML(qemu_domain_xml(name, image, tmp_path / "e.sock"), 0)
        dom.destroy()
    finally:
        conn.close()
    assert stopped.wait(20), f"no stop event; got {got}"
    # QEMU domains also announce "resumed" around the start: those come as "changed".
    assert {e.vm.name for e in got} == {name}
    kinds = [e.kind for e in got if e.kind != "changed"]
    assert kinds == ["started", "stopped"], [(e.kind, e.detail) for e in got]
    hv.close()


def test_discard_through_qemu_releases_qcow2_clusters(system_uri: str, qemu_domain: tuple[Any, Path]) -> None:
    dom, image = qemu_domain
    hv = driver(system_uri, dom.name())
    [info] = hv.vms()
    before = allocated_bytes(image)
    hv.discard(info.identity, info.disks[0], RangeSet.from_ranges([(1 * MiB, 2 * MiB)]))
    extents = json.loads(run(["qemu-img", "map", "-U", "--output=json", str(image)]))
    assert not any(e["data"] for e in extents), extents  # no guest byte is stored any more
    assert before - allocated_bytes(image) >= 2 * MiB  # and the file gave the space back
    hv.close()


def test_discard_on_a_stopped_domain_is_refused(system_uri: str, qemu_domain: tuple[Any, Path]) -> None:
    from vmreclaim.core.errors import HypervisorError

    dom, _ = qemu_domain
    hv = driver(system_uri, dom.name())
    [info] = hv.vms()
    dom.destroy()
    with pytest.raises(HypervisorError, match="not running"):
        hv.discard(info.identity, info.disks[0], RangeSet.from_ranges([(0, MiB)]))
