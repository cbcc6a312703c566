"""Hypervisor ``qemu``: QEMU processes reached through their QMP sockets (qemu.qmp).

For VMs started without libvirt: each configured VM names a QMP socket of its QEMU
(``-qmp unix:PATH,server=on,wait=off``; give vmreclaim a monitor of its own, since a
QMP socket serves one client at a time). ``qemu-storage-daemon`` works too: its exported
block nodes are its disks.

What QMP tells, per call (the connection is opened for each question and closed again,
so the monitor is never held):

* disks: ``query-block`` (devices and the image inserted in each), else, for a storage
  daemon, ``query-named-block-nodes`` and ``query-block-exports``; the disk id is the
  device's serial, else its qdev id, else the drive or node name;
* running state: the QMP socket answers (the process holds the images open: a paused
  VM counts as running) and ``query-status``;
* block jobs: ``query-block-jobs`` and ``query-jobs``; a job that cannot be tied to a
  disk is reported for every disk;
* the channel: the ``virtserialport`` named ``org.vmreclaim.0`` (``qom-list``/``qom-get``)
  and its chardev's socket (``query-chardev``). QEMU listening on it (``server=on``)
  means the host connects (transport ``virtio-serial``); QEMU connecting means the
  host listens (transport ``unix``).

QMP does not say whether a drive passes discards. ``discard: auto`` reads the option
from the QEMU process's own command line (the peer of the QMP socket,
``SO_PEERCRED``): ``discard=unmap`` on the ``-drive`` or on both ``-blockdev`` nodes.

Deep reclaim (capability ``discard``) discards through QEMU itself, so a qcow2 image
releases whole clusters in its metadata: HMP ``qemu-io -d DEVICE`` on a VM's device,
or, for a storage daemon, an NBD export of the node trimmed with ``qemu-io``.

Every QMP, socket and ``OSError`` failure becomes a
:class:`~vmreclaim.core.errors.HypervisorError` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import Field, field_validator
from qemu.qmp import ExecuteError, QMPClient, QMPError

from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.errors import DriverError, HypervisorError
from vmreclaim.core.hypervisors import (
    ChannelSpec,
    Hypervisor,
    HypervisorCapabilities,
    VMEvent,
    VMEventCallback,
    VMInfo,
    channel_options_model,
)
from vmreclaim.core.model import Disk, VMIdentity
from vmreclaim.core.ranges import RangeSet
from vmreclaim.plugins.hypervisors.qemu_qmp import (
    Device,
    QemuVM,
    State,
    as_qemu_opens,
    channel_chardev,
    cmdline,
    discard_through_fuse,
    execute,
    fuse_mountpoint,
    hmp,
    query_devices,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL_NAME = "org.vmreclaim.0"


class QemuOptions(DriverOptions):
    vms: list[QemuVM] = Field(min_length=1)
    #: The virtio-serial port name the agents use.
    channel_name: str = Field(default=CHANNEL_NAME, min_length=1, max_length=255)
    #: Transport of a port whose socket QEMU listens on (the host end connects).
    connect_transport: str = "virtio-serial"
    #: Transport of a port whose socket QEMU connects to (the host end listens).
    listen_transport: str = "unix"
    #: Seconds one QMP conversation may take.
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    #: How often :meth:`QemuHypervisor.watch` looks for VMs that started or stopped.
    poll_seconds: float = Field(default=2.0, gt=0, le=3600)

    @field_validator("vms")
    @classmethod
    def _unique(cls, vms: list[QemuVM]) -> list[QemuVM]:
        names = [v.name for v in vms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"VM names must be unique; repeated: {', '.join(dup)}")
        return vms


class QemuHypervisor(Hypervisor):
    """QEMU VMs (and storage daemons) listed in the configuration, asked over QMP."""

    Options = QemuOptions
    options: QemuOptions
    capabilities: ClassVar[HypervisorCapabilities] = HypervisorCapabilities(
        block_jobs=True, live_state=True, events=True, discard=True
    )

    def __init__(self, options: DriverOptions | None = None) -> None:
        super().__init__(options)
        self._transports: dict[str, type[DriverOptions]] = {}
        for name in {self.options.connect_transport, self.options.listen_transport}:
            self._transports[name] = channel_options_model(name, "qemu hypervisor")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qemu-qmp", daemon=True)
        self._thread.start()
        self._known: dict[str, tuple[Disk, ...]] = {}
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def close(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=self.options.poll_seconds + self.options.timeout_seconds)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()

    # -- QMP plumbing ----------------------------------------------------------------------

    def _run(self, vm: QemuVM, what: str, work: Callable[[QMPClient], Awaitable[T]]) -> T:
        """Run ``work`` on a fresh QMP connection to ``vm``; map every failure."""

        async def conversation() -> T:
            client = QMPClient(f"vmreclaim-{vm.name}")
            await client.connect(str(vm.qmp))
            try:
                return await work(client)
            finally:
                with contextlib.suppress(QMPError, OSError, EOFError):
                    await client.disconnect()

        async def bounded() -> T:
            return await asyncio.wait_for(conversation(), self.options.timeout_seconds)

        coro: Coroutine[Any, Any, T] = bounded()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        with self._errors(vm, what):
            return future.result()

    @contextlib.contextmanager
    def _errors(self, vm: QemuVM, what: str) -> Iterator[None]:
        where = f"QEMU {vm.name!r} (QMP {vm.qmp})"
        try:
            yield
        except ExecuteError as exc:
            raise HypervisorError(f"{where}: {what}: {exc.error_class}: {exc}") from exc
        except QMPError as exc:
            raise HypervisorError(f"{where}: {what}: {exc}") from exc
        except TimeoutError as exc:
            raise HypervisorError(
                f"{where}: {what}: no answer within {self.options.timeout_seconds}s"
            ) from exc
        except (OSError, EOFError) as exc:
            raise HypervisorError(f"{where}: {what}: {exc}") from exc

    def _vm(self, identity: VMIdentity) -> QemuVM | None:
        return next((v for v in self.options.vms if v.name == identity.name), None)

    def _probe(self, vm: QemuVM) -> int | None:
        """``None`` when nothing listens on the QMP socket (the QEMU process is gone),
        else the listener's pid (``SO_PEERCRED``; 0 if unknown).

        One short connection, made *before* a QMP conversation and never during one: a
        QMP socket serves one client at a time, and a connection left waiting in its
        backlog upsets the next client.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.options.timeout_seconds)
            try:
                s.connect(str(vm.qmp))
                raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            except OSError:
                return None
        pid, _uid, _gid = struct.unpack("3i", raw)
        return max(int(pid), 0)

    def _reachable(self, vm: QemuVM) -> bool:
        return self._probe(vm) is not None

    # -- listing ---------------------------------------------------------------------------

    def vms(self) -> list[VMInfo]:
        return [self._info(vm) for vm in self.options.vms]

    def refresh(self, vm: VMIdentity) -> VMInfo | None:
        found = self._vm(vm)
        return None if found is None else self._info(found)

    def _info(self, vm: QemuVM) -> VMInfo:
        identity = VMIdentity(vm.name, vm.uuid)
        pid = self._probe(vm) if vm.qmp.exists() else None
        if pid is None:
            # Not running: the disks last seen (a stopped VM can still be reclaimed
            # offline), and no channel.
            return VMInfo(identity, running=False, disks=self._known.get(vm.name, ()))
        state = self._run(vm, "describe the VM", lambda c: self._describe(c, vm, pid))
        disks = tuple(d.disk for d in state.devices)
        self._known[vm.name] = disks
        extra = {"qmp": str(vm.qmp), "status": state.status}
        if state.pid is not None:
            extra["pid"] = str(state.pid)
        return VMInfo(
            identity,
            running=True,
            disks=disks,
            channel=self._channel(vm, state.chardev, state.pid),
            extra=extra,
        )

    async def _describe(self, client: QMPClient, vm: QemuVM, pid: int) -> State:
        try:
            status = await execute(client, "query-status")
        except ExecuteError:  # qemu-storage-daemon runs no guest
            status = {"status": "storage-daemon"}
        argv = cmdline(pid) if pid else []
        devices = [
            replace(
                d,
                disk=replace(
                    d.disk, path=as_qemu_opens(d.disk.path, pid, f"QEMU {vm.name!r} disk {d.disk.id!r}")
                ),
            )
            for d in await query_devices(client, vm, argv)
        ]
        chardev = await channel_chardev(client, self.options.channel_name)
        return State(str(status.get("status", "unknown")), pid or None, devices, chardev)

    def _channel(self, vm: QemuVM, chardev: str | None, pid: int | None = None) -> ChannelSpec | None:
        if vm.channel is not None:
            doc = dict(vm.channel)
            driver = str(doc.pop("driver", ""))
            try:
                options = channel_options_model(driver, f"QEMU {vm.name!r}").model_validate(doc)
            except (DriverError, ValueError) as exc:
                raise HypervisorError(f"QEMU {vm.name!r}: configured channel: {exc}") from exc
            return ChannelSpec(driver, options)
        if chardev is None:
            return None
        filename = chardev.removeprefix("disconnected:")
        if not filename.startswith("unix:"):
            log.warning(
                "QEMU %s: channel chardev %s is not a Unix socket; configure 'channel'", vm.name, chardev
            )
            return None
        path, *flags = filename.removeprefix("unix:").split(",")
        path = str(as_qemu_opens(Path(path), pid or 0, f"QEMU {vm.name!r} channel"))
        server = any(f in ("server", "server=on") for f in flags)
        driver = self.options.connect_transport if server else self.options.listen_transport
        model = self._transports[driver]
        wanted: dict[str, Any] = {"path": path}
        if "name" in model.model_fields:
            wanted["name"] = self.options.channel_name
        try:
            return ChannelSpec(driver, model.model_validate(wanted))
        except ValueError as exc:
            raise HypervisorError(f"QEMU {vm.name!r}: channel options do not validate: {exc}") from exc

    # -- safety questions ------------------------------------------------------------------

    def block_jobs(self, vm: VMIdentity, disk: Disk) -> list[str]:
        found = self._vm(vm)
        if found is None or not self._reachable(found):
            return []
        return self._run(found, f"block jobs of {disk.key}", lambda c: self._jobs(c, found, disk))

    async def _jobs(self, client: QMPClient, vm: QemuVM, disk: Disk) -> list[str]:
        devices = await query_devices(client, vm, [])
        mine = next((d for d in devices if d.disk.id == disk.id), None)
        if mine is None:
            return [f"unknown (QEMU has no disk {disk.id!r} any more)"]
        all_names = set().union(*(d.names for d in devices))
        jobs = []
        block_jobs = await execute(client, "query-block-jobs")
        for job in block_jobs:
            device = str(job.get("device", ""))
            if device in mine.names or device not in all_names:
                jobs.append(f"{job.get('type', 'job')} {device}".strip())
        # Jobs that are not block jobs (snapshot-save, blockdev-create...) name no disk:
        # they count for every disk.
        seen = {str(j.get("device", "")) for j in block_jobs}
        for job in await execute(client, "query-jobs"):
            if job.get("id") in seen or job.get("status") in ("concluded", "null"):
                continue
            jobs.append(f"{job.get('type', 'job')} {job.get('id', '')}".strip())
        return jobs

    def discard(self, vm: VMIdentity, disk: Disk, ranges: RangeSet) -> None:
        found = self._vm(vm)
        pid = None if found is None else self._probe(found)
        if found is None or pid is None:
            raise HypervisorError(f"QEMU {vm.name!r} is not running: nothing to discard through")
        self._run(found, f"discard on {disk.key}", lambda c: self._discard(c, found, pid, disk, ranges))

    async def _discard(self, client: QMPClient, vm: QemuVM, pid: int, disk: Disk, ranges: RangeSet) -> None:
        devices = await query_devices(client, vm, [])
        mine = next((d for d in devices if d.disk.id == disk.id), None)
        if mine is None:
            raise HypervisorError(f"QEMU {vm.name!r} has no disk {disk.id!r}")
        if mine.qdev is not None:
            # The device's own block backend: the format node's write permission is
            # not shared with a second user.
            for r in ranges:
                await hmp(client, f'qemu-io -d {mine.qdev} "discard {r.start} {r.length}"', disk)
            await hmp(client, f'qemu-io -d {mine.qdev} "flush"', disk)
            return
        fuse = fuse_mountpoint(cmdline(pid) if pid else [], mine.disk.id)
        if fuse is not None:
            discard_through_fuse(fuse, mine.disk, ranges)
            return
        await self._discard_over_nbd(client, mine, ranges)

    async def _discard_over_nbd(self, client: QMPClient, device: Device, ranges: RangeSet) -> None:
        """A storage daemon has no HMP: export the node over NBD for a moment and TRIM."""
        qemu_io = shutil.which("qemu-io")
        if qemu_io is None:
            raise HypervisorError("deep discard over NBD needs qemu-io (package qemu-utils)")
        export = f"vmreclaim-{uuidlib.uuid4().hex[:8]}"
        with tempfile.TemporaryDirectory(prefix="vmreclaim-nbd-") as tmp:
            sock = f"{tmp}/nbd.sock"
            await execute(client, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
            try:
                await execute(
                    client,
                    "block-export-add",
                    {"type": "nbd", "id": export, "node-name": device.node, "name": export, "writable": True},
                )
                try:
                    commands = [f"discard {r.start} {r.length}" for r in ranges] + ["flush"]
                    args = [qemu_io, "-f", "raw", f"nbd+unix:///{export}?socket={sock}"]
                    for cmd in commands:
                        args += ["-c", cmd]
                    proc = await asyncio.create_subprocess_exec(
                        *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                    )
                    out, _ = await proc.communicate()
                    text = out.decode(errors="replace")
                    if proc.returncode != 0 or "error" in text.lower():
                        raise HypervisorError(f"NBD trim of {device.disk.key} failed: {text.strip()}")
                finally:
                    await execute(client, "block-export-del", {"id": export})
            finally:
                await execute(client, "nbd-server-stop")

    # -- events ----------------------------------------------------------------------------

    def watch(self, callback: VMEventCallback) -> None:
        """Poll every ``poll_seconds`` for VMs whose QEMU appeared or went away."""
        if self._watcher is not None:
            raise HypervisorError("qemu hypervisor: watch() was already called")
        up = {vm.name: self._reachable(vm) for vm in self.options.vms}

        def poll() -> None:
            while not self._watch_stop.wait(self.options.poll_seconds):
                for vm in self.options.vms:
                    now = self._reachable(vm)
                    if now != up[vm.name]:
                        up[vm.name] = now
                        kind = "started" if now else "stopped"
                        try:
                            callback(VMEvent(VMIdentity(vm.name, vm.uuid), kind, f"QMP socket {vm.qmp}"))
                        except Exception:  # a failing subscriber must not stop the poller
                            log.exception("qemu event callback failed")

        self._watcher = threading.Thread(target=poll, name="qemu-watch", daemon=True)
        self._watcher.start()
