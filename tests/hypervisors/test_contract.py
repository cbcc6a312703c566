"""One contract (vmreclaim.testing.HypervisorContract), every hypervisor driver
(STYLE.md rule 17): static, libvirt, qemu and xen, each against its real backend
(libvirt's test driver, a real QEMU, the XAPI simulator for Xen)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmreclaim.core import loader
from vmreclaim.core.config import HostConfig, load_config
from vmreclaim.core.hypervisors import Hypervisor
from vmreclaim.testing import HypervisorContract, require_tool, run

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


class TestStatic(HypervisorContract):
    driver = "static"

    @pytest.fixture
    def hypervisor(self, tmp_path: Path) -> Iterator[Hypervisor]:
        yield from _static(tmp_path)


@pytest.mark.kvm
class TestLibvirt(HypervisorContract):
    driver = "libvirt"

    @pytest.fixture
    def hypervisor(self, tmp_path: Path) -> Iterator[Hypervisor]:
        yield from _libvirt(tmp_path)


@pytest.mark.qemu
class TestQemu(HypervisorContract):
    driver = "qemu"

    @pytest.fixture
    def hypervisor(self, tmp_path: Path) -> Iterator[Hypervisor]:
        yield from _qemu(tmp_path)


@pytest.mark.xen
class TestXen(HypervisorContract):
    driver = "xen"

    @pytest.fixture
    def hypervisor(self, tmp_path: Path) -> Iterator[Hypervisor]:
        yield from _xen(tmp_path)


def test_every_builtin_hypervisor_is_under_contract() -> None:
    builtin = {d.name for d in loader.installed("hypervisors") if d.distribution == "vmreclaim"}
    assert {cls.driver for cls in HypervisorContract.__subclasses__()} == builtin
