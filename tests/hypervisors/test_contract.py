"""One contract, every hypervisor driver (STYLE.md rule 17): what the host daemon
relies on holds for static, libvirt, qemu and xen alike, each against its real backend
(libvirt's test driver, a real QEMU, the XAPI simulator for Xen)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmreclaim.core import loader
from vmreclaim.core.config import HostConfig, load_config
from vmreclaim.core.hypervisors import Hypervisor, VMInfo
from vmreclaim.core.model import VMIdentity
from vmreclaim.testing import require_tool, run

from .test_qemu import stop, wait_for_socket


def _static(tmp_path: Path) -> Iterator[Hypervisor]:
    image = tmp_path / "s.raw"
    image.write_bytes(b"")
    config = tmp_path / "host.yaml"
    config.write_text(
        f"""hypervisor:
  driver: static
  vms:
    - name: vm1
      disks:
        - {{id: disk0, path: {image}, format: raw}}
      channel: {{driver: unix, path: {tmp_path / "vm1.sock"}}}
database: {tmp_path / "db.sqlite"}
status_socket: {tmp_path / "status.sock"}
"""
    )
    hv = loader.load_driver(
        "hypervisors", "static", Hypervisor, load_config(config, HostConfig).hypervisor.options
    )
    yield hv
    hv.close()


def _libvirt(tmp_path: Path) -> Iterator[Hypervisor]:
    libvirt = pytest.importorskip("libvirt", reason="needs libvirt-python (the kvm extra)")
    from .test_libvirt import domain_xml

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open("test:///default")
    name = f"contract-{uuid.uuid4().hex[:8]}"
    dom = conn.defineXML(domain_xml(name, str(uuid.uuid4())))
    dom.create()
    opts = loader.driver_class("hypervisors", "libvirt").Options
    hv = loader.load_driver(
        "hypervisors",
        "libvirt",
        Hypervisor,
        opts(uri="test:///default", domains=[name]),
    )
    yield hv
    hv.close()
    dom.destroy()
    dom.undefine()
    conn.close()


def _qemu(tmp_path: Path) -> Iterator[Hypervisor]:
    require_tool("qemu-system-x86_64", "qemu-img")
    image = tmp_path / "q.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"])
    qmp = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "64", "-S", "-nodefaults",
         "-display", "none", "-drive", f"file={image},format=qcow2,if=none,id=d0",
         "-device", "virtio-blk-pci,drive=d0,serial=disk0", "-qmp", f"unix:{qmp},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for_socket(qmp, proc)
        opts = loader.driver_class("hypervisors", "qemu").Options
        hv = loader.load_driver(
            "hypervisors", "qemu", Hypervisor,
            opts.model_validate({"vms": [{"name": "vm1", "qmp": str(qmp)}]}),
        )  # fmt: skip
        yield hv
        hv.close()
    finally:
        stop(proc)


def _xen(tmp_path: Path) -> Iterator[Hypervisor]:
    pytest.importorskip("XenAPI", reason="needs XenAPI (the xen extra)")
    from .xapi_simulator import XapiSimulator

    sim = XapiSimulator().start()
    sr = sim.add_sr("ext")
    sim.add_vm("vm1", "Running", [(sr, "0")])
    opts = loader.driver_class("hypervisors", "xen").Options
    hv = loader.load_driver("hypervisors", "xen", Hypervisor, opts(url=sim.url, password=sim.password))
    yield hv
    hv.close()
    sim.stop()


FACTORIES = {"static": _static, "libvirt": _libvirt, "qemu": _qemu, "xen": _xen}
MARKS = {"libvirt": [pytest.mark.kvm], "qemu": [pytest.mark.qemu], "xen": [pytest.mark.xen]}


@pytest.fixture(params=[pytest.param(n, marks=MARKS.get(n, [])) for n in FACTORIES])
def hypervisor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hypervisor]:
    yield from FACTORIES[request.param](tmp_path)


def test_driver_is_a_registered_hypervisor(hypervisor: Hypervisor) -> None:
    installed = {d.name: d for d in loader.installed("hypervisors")}
    name = next(n for n, d in installed.items() if d.target.endswith(type(hypervisor).__name__))
    assert installed[name].error is None
    assert loader.driver_class("hypervisors", name) is type(hypervisor)


def test_vms_describe_disks_of_their_own(hypervisor: Hypervisor) -> None:
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


def test_refresh_is_consistent_with_vms(hypervisor: Hypervisor) -> None:
    for info in hypervisor.vms():
        again = hypervisor.refresh(info.identity)
        assert again is not None
        assert again.identity.name == info.identity.name
        assert [d.id for d in again.disks] == [d.id for d in info.disks]
    assert hypervisor.refresh(VMIdentity("no-such-vm-anywhere")) is None


def test_capabilities_are_honest(hypervisor: Hypervisor) -> None:
    caps = type(hypervisor).capabilities
    got: list[Any] = []
    if caps.events:
        hypervisor.watch(got.append)  # must start without error
    if not caps.discard:
        from vmreclaim.core.errors import HypervisorError
        from vmreclaim.core.ranges import RangeSet

        info = hypervisor.vms()[0]
        with pytest.raises(HypervisorError):
            hypervisor.discard(info.identity, info.disks[0], RangeSet.from_ranges([(0, 4096)]))
