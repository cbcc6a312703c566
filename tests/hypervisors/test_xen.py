"""The xen driver against the XAPI *simulator* (``xapi_simulator.py``): Xen cannot run
here, so these tests prove the driver's logic, not compatibility with a real pool."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmreclaim.core import loader
from vmreclaim.core.errors import HypervisorError
from vmreclaim.core.hypervisors import VMEvent
from vmreclaim.core.model import VMIdentity

XenAPI = pytest.importorskip("XenAPI", reason="needs XenAPI (the xen extra)")

from vmreclaim.plugins.hypervisors.xen import (  # noqa: E402
    PORT_KEY,
    SECRET_KEY,
    XenHypervisor,
    XenOptions,
)

from .xapi_simulator import XapiSimulator  # noqa: E402

pytestmark = pytest.mark.xen


@pytest.fixture
def xapi() -> Iterator[XapiSimulator]:
    sim = XapiSimulator().start()
    yield sim
    sim.stop()


@pytest.fixture
def pool(xapi: XapiSimulator) -> dict[str, str]:
    """Two file SRs and an LVM SR; VMs running, paused, halted; a template; dom0."""
    ext = xapi.add_sr("ext")
    nfs = xapi.add_sr("nfs")
    lvm = xapi.add_sr("lvm")
    return {
        "ext": ext,
        "nfs": nfs,
        "lvm": lvm,
        "web": xapi.add_vm("web", "Running", [(ext, "0"), (nfs, "1"), (lvm, "2")], raw=("1",), cdrom=True),
        "db": xapi.add_vm("db", "Paused", [(ext, "0")]),
        "old": xapi.add_vm("old", "Halted", [(nfs, "0")]),
        "tmpl": xapi.add_vm("tmpl", "Halted", [(ext, "0")], is_a_template=True),
        "dom0": xapi.add_vm("Control domain", "Running", [], is_control_domain=True),
    }


def driver(xapi: XapiSimulator, **options: Any) -> XenHypervisor:
    if "url" not in options:
        options["url"] = xapi.url
    options.setdefault("password", xapi.password)
    hv = loader.driver_class("hypervisors", "xen")(XenOptions.model_validate(options))
    assert isinstance(hv, XenHypervisor)
    return hv


def test_vms_disks_and_power_states(xapi: XapiSimulator, pool: dict[str, str]) -> None:
    hv = driver(xapi)
    try:
        infos = {i.identity.name: i for i in hv.vms()}
        assert set(infos) == {"web", "db", "old"}  # no template, no control domain
        assert (infos["web"].running, infos["db"].running, infos["old"].running) == (True, True, False)
        web = infos["web"]
        ext_uuid, nfs_uuid = xapi.srs[pool["ext"]]["uuid"], xapi.srs[pool["nfs"]]["uuid"]
        vdi = {v["SR"]: v["uuid"] for k, v in xapi.vdis.items() if xapi.vbds and any(
            b["VDI"] == k and b["VM"] == pool["web"] for b in xapi.vbds.values())}  # fmt: skip
        assert [(d.id, d.path, d.format, d.passes_discards) for d in web.disks] == [
            ("xvda", Path(f"/var/run/sr-mount/{ext_uuid}/{vdi[pool['ext']]}.vhd"), "vhd", False),
            ("xvdb", Path(f"/var/run/sr-mount/{nfs_uuid}/{vdi[pool['nfs']]}.raw"), "raw", False),
        ]
        assert "is not file-based" in web.extra["skipped_disks"]  # the LVM VDI, named
        assert web.identity.uuid == xapi.vms[pool["web"]]["uuid"]
    finally:
        hv.close()


def test_each_vm_gets_its_own_port_and_secret_in_xenstore_data(
    xapi: XapiSimulator, pool: dict[str, str]
) -> None:
    # A VM outside this daemon's list already holds port 5230: it is not handed out again.
    other = xapi.add_vm("other", "Running", [])
    xapi.vms[other]["xenstore_data"] = {PORT_KEY: "5230", SECRET_KEY: "x" * 64}
    hv = driver(xapi, vms=["web", "db", "old"], port_base=5230, listen_address="127.0.0.1")
    try:
        infos = {i.identity.name: i for i in hv.vms()}
        ports, secrets = {}, {}
        for name, ref in (("web", pool["web"]), ("db", pool["db"]), ("old", pool["old"])):
            data = xapi.vms[ref]["xenstore_data"]
            assert re.fullmatch(r"[0-9a-f]{64}", data[SECRET_KEY])
            ports[name], secrets[name] = int(data[PORT_KEY]), data[SECRET_KEY]
            channel = infos[name].channel
            assert channel is not None and channel.driver == "tcp"
            assert channel.options.port == ports[name]  # type: ignore[attr-defined]
        assert len(set(ports.values())) == 3 and 5230 not in ports.values()
        assert len(set(secrets.values())) == 3  # one guest cannot speak for another
        # Asking again keeps what was provisioned (a daemon restart does not re-key).
        hv.vms()
        assert {n: int(xapi.vms[pool[n]]["xenstore_data"][PORT_KEY]) for n in ports} == ports
        assert xapi.calls.count("VM.add_to_xenstore_data") == 9
    finally:
        hv.close()


def test_without_provisioning_a_vm_has_no_channel(xapi: XapiSimulator, pool: dict[str, str]) -> None:
    hv = driver(xapi, provision=False, vms=["web"])
    try:
        [info] = hv.vms()
        assert info.channel is None
        assert "VM.add_to_xenstore_data" not in xapi.calls
    finally:
        hv.close()


def test_refresh_by_uuid_and_name_and_destroyed(xapi: XapiSimulator, pool: dict[str, str]) -> None:
    hv = driver(xapi)
    try:
        uid = xapi.vms[pool["db"]]["uuid"]
        assert hv.refresh(VMIdentity("db", uid)).running  # type: ignore[union-attr]
        xapi.set_power_state(pool["db"], "Halted")
        assert hv.refresh(VMIdentity("db")).running is False  # type: ignore[union-attr]
        xapi.destroy_vm(pool["db"])
        assert hv.refresh(VMIdentity("db", uid)) is None
        assert hv.refresh(VMIdentity("db")) is None
        assert hv.refresh(VMIdentity("tmpl")) is None  # templates are never served
    finally:
        hv.close()


def test_vm_and_vdi_operations_are_block_jobs(xapi: XapiSimulator, pool: dict[str, str]) -> None:
    hv = driver(xapi, vms=["web"])
    try:
        [info] = hv.vms()
        xvda, xvdb = info.disks
        assert hv.block_jobs(info.identity, xvda) == []
        vdi_ref = next(
            b["VDI"] for b in xapi.vbds.values() if b["VM"] == pool["web"] and b["userdevice"] == "1"
        )
        xapi.vdis[vdi_ref]["current_operations"] = {"OpaqueRef:task1": "copy"}
        assert hv.block_jobs(info.identity, xvda) == []
        assert hv.block_jobs(info.identity, xvdb) == ["VDI copy"]
        xapi.vms[pool["web"]]["current_operations"] = {"OpaqueRef:task2": "snapshot"}
        assert hv.block_jobs(info.identity, xvda) == ["VM snapshot"]
    finally:
        hv.close()


def test_events_follow_start_stop_and_destroy(xapi: XapiSimulator, pool: dict[str, str]) -> None:
    hv = driver(xapi, vms=["old", "new"], provision=False)
    got: list[VMEvent] = []
    done = threading.Event()

    def on_event(ev: VMEvent) -> None:
        got.append(ev)
        if ev.kind == "undefined":
            done.set()

    try:
        hv.watch(on_event)
        xapi.set_power_state(pool["old"], "Running")
        xapi.set_power_state(pool["web"], "Halted")  # not served: no event
        new = xapi.add_vm("new", "Halted", [])
        xapi.set_power_state(pool["old"], "Halted")
        xapi.destroy_vm(new)
        assert done.wait(10), got
        assert [(e.vm.name, e.kind) for e in got] == [
            ("old", "started"), ("new", "defined"), ("old", "stopped"), ("new", "undefined"),
        ]  # fmt: skip
    finally:
        hv.close()


def test_xapi_failures_become_hypervisor_errors(xapi: XapiSimulator, pool: dict[str, str]) -> None:
    bad = driver(xapi, password="wrong")
    with pytest.raises(HypervisorError, match="SESSION_AUTHENTICATION_FAILED") as err:
        bad.vms()
    assert isinstance(err.value.__cause__, XenAPI.Failure)

    hv = driver(xapi)
    try:
        xapi.fail_next("VBD.get_record", "HANDLE_INVALID", "VBD", "OpaqueRef:x")
        with pytest.raises(HypervisorError, match="HANDLE_INVALID VBD") as err:
            hv.vms()
        assert isinstance(err.value.__cause__, XenAPI.Failure)

        xapi.garble("SR.get_record")  # a broken server: the library raises an XML-RPC fault
        with pytest.raises(HypervisorError, match="XML-RPC fault 500") as err:
            hv.vms()
        assert isinstance(err.value.__cause__, Exception) and "Fault" in type(err.value.__cause__).__name__
    finally:
        hv.close()

    url = xapi.url
    xapi.stop()  # nobody listens any more: connection refused
    gone = driver(xapi, url=url)
    with pytest.raises(HypervisorError, match="Connection refused") as err:
        gone.vms()
    assert isinstance(err.value.__cause__, OSError)


def test_password_file_and_option_checks(xapi: XapiSimulator, pool: dict[str, str], tmp_path: Path) -> None:
    secret = tmp_path / "xapi.pw"
    secret.write_text(f"{xapi.password}\n")
    hv = driver(xapi, password=None, password_file=str(secret))
    try:
        assert {i.identity.name for i in hv.vms()} == {"web", "db", "old"}
    finally:
        hv.close()
    with pytest.raises(ValueError, match="not both"):
        XenOptions(password="a", password_file=secret)
    with pytest.raises(ValueError, match="passes 65535"):
        XenOptions(port_base=65000, port_count=1000)
