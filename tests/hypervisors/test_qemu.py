"""The qemu driver against real ``qemu-system-x86_64`` and ``qemu-storage-daemon``
processes, asked over their QMP sockets. The VMs boot nothing (``-S``: paused before
the first instruction); QMP, block jobs and QEMU's own discard do not need a guest."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPError

from vmreclaim.core import loader
from vmreclaim.core.errors import HypervisorError
from vmreclaim.core.hypervisors import VMEvent
from vmreclaim.core.model import VMIdentity
from vmreclaim.core.ranges import RangeSet
from vmreclaim.plugins.hypervisors.qemu import QemuHypervisor, QemuOptions
from vmreclaim.plugins.hypervisors.qemu_qmp import discard_from_cmdline
from vmreclaim.testing import require_root, require_tool, run
from vmreclaim.testing.guest import allocated_bytes

pytestmark = pytest.mark.qemu

MiB = 1024 * 1024


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"{proc.args!r} exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}"
            )
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def qemu_vm(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Factory: start a paused QEMU with a qcow2 ``-drive`` (discard=unmap, serial
    data0, 2 MiB of data at 1 MiB), a raw ``-blockdev`` disk without discard, and the
    vmreclaim virtio-serial port on a socket QEMU listens on."""
    require_tool("qemu-system-x86_64", "qemu-img", "qemu-io")
    qcow2, raw = tmp_path / "d0.qcow2", tmp_path / "d1.raw"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(qcow2)])
    run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "32M"])
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        qmp = tmp_path / "qmp.sock"
        qmp.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [
                "qemu-system-x86_64",
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-m",
                "64",
                "-S",
                "-nodefaults",
                "-display",
                "none",
                "-drive",
                f"file={qcow2},format=qcow2,if=none,id=drive0,discard=unmap",
                "-device",
                "virtio-blk-pci,drive=drive0,id=blk0,serial=data0",
                "-blockdev",
                f"driver=file,filename={raw},node-name=raw-file",
                "-blockdev",
                "driver=raw,file=raw-file,node-name=raw-fmt",
                "-device",
                "virtio-blk-pci,drive=raw-fmt,id=blk1",
                "-device",
                "virtio-serial-pci,id=vser0",
                "-chardev",
                f"socket,id=port0,path={tmp_path / 'ch.sock'},server=on,wait=off",
                "-device",
                "virtserialport,bus=vser0.0,chardev=port0,name=org.vmreclaim.0",
                "-qmp",
                f"unix:{qmp},server=on,wait=off",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        wait_for_socket(qmp, proc)
        return proc

    yield start
    for proc in procs:
        stop(proc)


def driver(tmp_path: Path, **options: Any) -> QemuHypervisor:
    options.setdefault("vms", [{"name": "vm1", "qmp": str(tmp_path / "qmp.sock")}])
    hv = loader.driver_class("hypervisors", "qemu")(QemuOptions.model_validate(options))
    assert isinstance(hv, QemuHypervisor)
    return hv


def test_disks_state_and_channel_from_qmp(qemu_vm: Callable[[], Any], tmp_path: Path) -> None:
    qemu_vm()
    hv = driver(tmp_path)
    try:
        [info] = hv.vms()
        assert info.running and info.extra["status"] == "prelaunch"
        d0, d1 = info.disks
        assert (d0.id, d0.path, d0.format, d0.passes_discards, d0.serial, d0.target) == (
            "data0", tmp_path / "d0.qcow2", "qcow2", True, "data0", "blk0",
        )  # fmt: skip
        assert (d1.id, d1.path, d1.format, d1.passes_discards, d1.serial) == (
            "blk1", tmp_path / "d1.raw", "raw", False, None,
        )  # fmt: skip
        # QEMU listens on the port's socket (server=on): the host end connects.
        assert info.channel is not None and info.channel.driver == "virtio-serial"
        assert info.channel.options.path == tmp_path / "ch.sock"  # type: ignore[attr-defined]
        # Per-disk override of what the command line says.
        hv2 = driver(tmp_path, vms=[{"name": "vm1", "qmp": str(tmp_path / "qmp.sock"),
                                     "disks": [{"id": "data0", "discard": False}]}])  # fmt: skip
        assert hv2.vms()[0].disks[0].passes_discards is False
        hv2.close()
    finally:
        hv.close()


def test_stopped_vm_keeps_its_last_known_disks(qemu_vm: Callable[[], Any], tmp_path: Path) -> None:
    proc = qemu_vm()
    hv = driver(tmp_path)
    try:
        seen = hv.vms()[0].disks
        stop(proc)
        info = hv.refresh(VMIdentity("vm1"))
        assert info is not None and not info.running and info.channel is None
        assert info.disks == seen
        assert hv.refresh(VMIdentity("not-configured")) is None
        assert hv.block_jobs(info.identity, seen[0]) == []
    finally:
        hv.close()


def test_mirror_job_is_reported_on_its_disk_only(qemu_vm: Callable[[], Any], tmp_path: Path) -> None:
    qemu_vm()
    hv = driver(tmp_path)
    try:
        [info] = hv.vms()
        d0, d1 = info.disks

        async def mirror(client: Any) -> Any:
            return await client.execute(
                "drive-mirror",
                {"device": "drive0", "target": str(tmp_path / "m.qcow2"), "format": "qcow2", "sync": "full"},
            )

        hv._run(hv.options.vms[0], "start a mirror", mirror)
        assert hv.block_jobs(info.identity, d0) == ["mirror drive0"]
        assert hv.block_jobs(info.identity, d1) == []

        async def cancel(client: Any) -> Any:
            return await client.execute("block-job-cancel", {"device": "drive0", "force": True})

        hv._run(hv.options.vms[0], "cancel the mirror", cancel)
        for _ in range(200):
            if not hv.block_jobs(info.identity, d0):
                break
            time.sleep(0.05)
        assert hv.block_jobs(info.identity, d0) == []
    finally:
        hv.close()


def test_deep_discard_through_hmp_releases_qcow2_clusters(qemu_vm: Callable[[], Any], tmp_path: Path) -> None:
    qemu_vm()
    hv = driver(tmp_path)
    image = tmp_path / "d0.qcow2"
    try:
        [info] = hv.vms()
        before = allocated_bytes(image)
        hv.discard(info.identity, info.disks[0], RangeSet.from_ranges([(1 * MiB, 2 * MiB)]))
        extents = json.loads(run(["qemu-img", "map", "-U", "--output=json", str(image)]))
        assert not any(e["data"] for e in extents), extents
        assert before - allocated_bytes(image) >= 2 * MiB
    finally:
        hv.close()


@contextlib.contextmanager
def storage_daemon(tmp_path: Path, *export: str, relative: bool = False) -> Iterator[tuple[Path, Path]]:
    """``qemu-storage-daemon`` serving a qcow2 (4 MiB of data at 4 MiB, discard=unmap
    on both nodes) with the ``export`` arguments; yields (image, QMP socket). With
    ``relative`` the daemon runs in ``tmp_path`` and is given the image's bare name."""
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")
    image, qmp = tmp_path / "s.qcow2", tmp_path / "qsd.sock"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 4M 4M", str(image)])
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,filename={image.name if relative else image},node-name=s-file,discard=unmap",
            "--blockdev",
            "driver=qcow2,file=s-file,node-name=s-fmt,discard=unmap",
            *export,
            "--chardev",
            f"socket,id=m0,path={qmp},server=on,wait=off",
            "--monitor",
            "chardev=m0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        wait_for_socket(qmp, proc)
        yield image, qmp
    finally:
        stop(proc)


def test_storage_daemon_exports_are_disks(tmp_path: Path) -> None:
    nbd = ("--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
           "--export", "type=nbd,id=vol0,node-name=s-fmt,writable=on")  # fmt: skip
    with storage_daemon(tmp_path, *nbd) as (image, qmp):
        hv = driver(tmp_path, vms=[{"name": "store", "qmp": str(qmp)}])
        try:
            [info] = hv.vms()
            [disk] = info.disks
            assert (disk.id, disk.path, disk.format, disk.passes_discards) == ("vol0", image, "qcow2", True)
            assert hv.block_jobs(info.identity, disk) == []
            # The daemon already runs an NBD server: the driver's own must not clash.
            with pytest.raises(HypervisorError, match="NBD server already running"):
                hv.discard(info.identity, disk, RangeSet.from_ranges([(4 * MiB, 4 * MiB)]))
        finally:
            hv.close()


def test_relative_image_names_resolve_against_qemus_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU opens a relative name from its own working directory; ours differs, and the
    host must never open (let alone punch) a file of the same name next to itself."""
    nbd = ("--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
           "--export", "type=nbd,id=vol0,node-name=s-fmt,writable=on")  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with storage_daemon(tmp_path, *nbd, relative=True) as (image, qmp):
        hv = driver(tmp_path, vms=[{"name": "store", "qmp": str(qmp)}])
        try:
            [disk] = hv.vms()[0].disks
            assert disk.path == image and disk.path.is_absolute()
        finally:
            hv.close()


@pytest.mark.root
def test_storage_daemon_deep_discard_through_its_fuse_export(tmp_path: Path) -> None:
    """A live qcow2 served as a FUSE file (as the agent tests use it): the driver
    punches the FUSE file, which QEMU turns into a discard of the qcow2 node."""
    require_root()
    fuse = tmp_path / "fuse"
    fuse.touch()
    try:
        with storage_daemon(
            tmp_path, "--export", f"type=fuse,id=vol0,node-name=s-fmt,mountpoint={fuse},writable=on"
        ) as (image, qmp):
            hv = driver(tmp_path, vms=[{"name": "store", "qmp": str(qmp)}])
            try:
                [info] = hv.vms()
                [disk] = info.disks
                before = allocated_bytes(image)
                hv.discard(info.identity, disk, RangeSet.from_ranges([(4 * MiB, 4 * MiB)]))
                assert before - allocated_bytes(image) >= 4 * MiB
                # The live disk reads zeros there now.
                with open(fuse, "rb") as f:
                    f.seek(4 * MiB)
                    assert f.read(4 * MiB) == bytes(4 * MiB)
            finally:
                hv.close()
    finally:
        subprocess.run(["fusermount3", "-u", str(fuse)], capture_output=True)


def test_qmp_errors_become_hypervisor_errors(qemu_vm: Callable[[], Any], tmp_path: Path) -> None:
    qemu_vm()
    hv = driver(tmp_path, timeout_seconds=2)
    vm = hv.options.vms[0]
    try:

        async def bad(client: Any) -> Any:
            return await client.execute("no-such-command")

        with pytest.raises(HypervisorError, match="CommandNotFound") as err:
            hv._run(vm, "ask nonsense", bad)
        assert isinstance(err.value.__cause__, ExecuteError)

        # Something that is not QMP listens on the socket: no greeting, then a timeout.
        mute = tmp_path / "mute.sock"
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(mute))
            server.listen()
            mute_vm = vm.model_copy(update={"qmp": mute})
            with pytest.raises(HypervisorError, match="no answer within") as err:
                hv._run(mute_vm, "greet", bad)
            assert isinstance(err.value.__cause__, TimeoutError)

        # Nothing listens: the connection error (an OSError inside) is mapped too.
        gone_vm = vm.model_copy(update={"qmp": tmp_path / "absent.sock"})
        with pytest.raises(HypervisorError, match=r"absent\.sock") as err:
            hv._run(gone_vm, "connect", bad)
        assert isinstance(err.value.__cause__, (QMPError, OSError))
    finally:
        hv.close()


def test_watch_reports_start_and_stop(qemu_vm: Callable[[], Any], tmp_path: Path) -> None:
    hv = driver(tmp_path, poll_seconds=0.1)
    got: list[VMEvent] = []
    stopped = threading.Event()

    def on_event(ev: VMEvent) -> None:
        got.append(ev)
        if ev.kind == "stopped":
            stopped.set()

    try:
        hv.watch(on_event)
        proc = qemu_vm()
        for _ in range(100):
            if got:
                break
            time.sleep(0.05)
        stop(proc)
        assert stopped.wait(10), got
        assert [(e.vm.name, e.kind) for e in got] == [("vm1", "started"), ("vm1", "stopped")]
    finally:
        hv.close()


@pytest.mark.parametrize(
    ("argv", "drive", "chain", "expected"),
    [
        (["-drive", "file=a,,b.qcow2,id=d0,discard=unmap"], "d0", [], True),
        (["-drive", "file=a.qcow2,id=d0,discard=ignore"], "d0", [], False),
        (["-drive", "file=a.qcow2,id=d0"], "d0", [], False),
        (["-blockdev", "driver=file,filename=a,node-name=f,discard=unmap",
          "-blockdev", "driver=qcow2,file=f,node-name=q,discard=unmap"], "", ["q", "f"], True),
        (["-blockdev", "driver=file,filename=a,node-name=f,discard=unmap",
          "-blockdev", "driver=qcow2,file=f,node-name=q"], "", ["q", "f"], False),
        (["-blockdev", '{"driver":"qcow2","node-name":"q","discard":"unmap","file":'
          '{"driver":"file","filename":"a","node-name":"f","discard":"unmap"}}'], "", ["q", "f"], True),
        (["-blockdev", "{not json"], "", ["q"], False),
    ],
)  # fmt: skip
def test_discard_mode_from_the_command_line(
    argv: list[str], drive: str, chain: list[str], expected: bool
) -> None:
    assert discard_from_cmdline(["qemu-system-x86_64", *argv], drive, chain) is expected


def test_channel_transport_follows_who_listens(tmp_path: Path) -> None:
    """QEMU listening on the port's socket (server=on) → the host connects
    (virtio-serial); QEMU connecting to it → the host listens (unix)."""
    hv = driver(tmp_path)
    vm = hv.options.vms[0]
    try:
        bound = hv._channel(vm, f"disconnected:unix:{tmp_path / 'a.sock'},server=on")
        assert bound is not None and bound.driver == "virtio-serial"
        assert bound.options.path == tmp_path / "a.sock"  # type: ignore[attr-defined]
        connecting = hv._channel(vm, f"unix:{tmp_path / 'b.sock'}")
        assert connecting is not None and connecting.driver == "unix"
        assert connecting.options.path == tmp_path / "b.sock"  # type: ignore[attr-defined]
        assert hv._channel(vm, "pty:/dev/pts/3") is None  # not a socket: configure the channel
        configured = hv._channel(
            vm.model_copy(update={"channel": {"driver": "unix", "path": str(tmp_path / "c.sock")}}), None
        )
        assert configured is not None and configured.driver == "unix"
        with pytest.raises(HypervisorError, match="configured channel"):
            hv._channel(vm.model_copy(update={"channel": {"driver": "unix", "bogus": 1}}), None)
    finally:
        hv.close()
