"""Hypervisor ``libvirt``: KVM/QEMU domains managed by libvirtd (extra ``[kvm]``).

Everything comes from libvirt itself (libvirt-python): the domains (by name or UUID),
their live XML (the image file, driver type, target, serial and ``discard`` mode of each
disk; the vmreclaim channel), whether they run, their block jobs, and lifecycle events.

The channel is a virtio-serial port named ``org.vmreclaim.0`` (``<channel type='unix'>``,
added by ``vmreclaim libvirt enable DOMAIN``). QEMU *binds* its Unix socket, so the host
daemon reaches it through the ``virtio-serial`` transport, whose host end connects. A
``<vsock>`` device with a CID is used instead when the domain has no such channel.

libvirt owns the QEMU monitor of its domains; this driver never opens it. A deep
reclaim goes through ``virDomainQemuMonitorCommand`` (HMP ``qemu-io``) on the format
node libvirt named, which QEMU logs as a tainting custom-monitor command.

Every libvirt error is mapped to :class:`~vmreclaim.core.errors.HypervisorError` here.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.errors import DriverLoadError, HypervisorError, UsageError
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

try:
    import libvirt
except ImportError as _exc:  # the loader reports this as "failed to load", naming the extra
    raise ImportError(
        "the libvirt hypervisor driver needs libvirt-python: pip install 'vmreclaim[kvm]'"
    ) from _exc

log = logging.getLogger(__name__)

#: The virtio-serial port name of the vmreclaim agent.
CHANNEL_NAME = "org.vmreclaim.0"
#: libvirt's driver type → vmreclaim's format driver name. libvirt (like QEMU) calls
#: VHD ``vpc``; a disk without a driver type is raw (libvirt does not probe formats).
FORMAT_NAMES = {"vpc": "vhd"}
#: Domain lifecycle events (``virDomainEventType``) → :data:`VM_EVENT_KINDS`.
_EVENT_KINDS = {0: "defined", 1: "undefined", 2: "started", 5: "stopped", 8: "stopped"}
_EVENT_NAMES = {
    0: "defined", 1: "undefined", 2: "started", 3: "suspended", 4: "resumed",
    5: "stopped", 6: "shutdown", 7: "pmsuspended", 8: "crashed",
}  # fmt: skip
_BLOCK_JOB_TYPES = {0: "unknown", 1: "pull", 2: "copy", 3: "commit", 4: "active-commit", 5: "backup"}
_DOMAIN_JOB_OPERATIONS = {
    1: "start", 2: "save", 3: "restore", 4: "migration-in", 5: "migration-out",
    6: "snapshot", 7: "snapshot-revert", 8: "dump", 9: "backup", 10: "snapshot-delete",
}  # fmt: skip


class LibvirtOptions(DriverOptions):
    #: The libvirt connection URI.
    uri: str = Field(default="qemu:///system", min_length=1)
    #: Domains to serve, by name or UUID; empty: every domain of the connection.
    domains: list[str] = Field(default_factory=list)
    #: The virtio-serial port name the agents use.
    channel_name: str = Field(default=CHANNEL_NAME, min_length=1, max_length=255)
    #: Transport driver of a ``<channel type='unix'>`` port on the host side (its host
    #: end must connect to the socket QEMU binds).
    channel_transport: str = "virtio-serial"
    #: Transport driver and port of a ``<vsock>`` device (used when there is no channel).
    vsock_transport: str = "vsock"
    vsock_port: int = Field(default=5225, ge=1, le=0xFFFFFFFE)
    #: Follow domain lifecycle events with libvirt's event loop (one thread).
    events: bool = True
    #: Seconds a libvirt call may take before the connection is considered dead.
    keepalive_seconds: int = Field(default=5, ge=0, le=300)


@dataclass(frozen=True)
class _Channel:
    kind: str  # "unix" or "vsock"
    path: str | None = None
    cid: int | None = None


class LibvirtHypervisor(Hypervisor):
    """Domains of one libvirt connection."""

    Options = LibvirtOptions
    options: LibvirtOptions
    capabilities: ClassVar[HypervisorCapabilities] = HypervisorCapabilities(
        block_jobs=True, live_state=True, events=True, discard=True
    )

    def __init__(self, options: DriverOptions | None = None) -> None:
        super().__init__(options)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._callbacks: list[VMEventCallback] = []
        self._event_ids: list[int] = []
        self._channel_cls = self._transport_options(self.options.channel_transport)
        self._vsock_cls = self._transport_options(self.options.vsock_transport, required=False)
        _silence_stderr()
        if self.options.events:
            _start_event_loop()

    # -- connection ------------------------------------------------------------------------

    @staticmethod
    def _transport_options(name: str, *, required: bool = True) -> type[DriverOptions] | None:
        try:
            return channel_options_model(name, "libvirt hypervisor")
        except DriverLoadError:
            if required:
                raise
            return None

    @contextlib.contextmanager
    def _calls(self, what: str) -> Iterator[None]:
        """Map libvirt's and the XML parser's errors to HypervisorError, naming ``what``."""
        try:
            yield
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR):
                self._drop_connection()  # reconnect on the next call
            raise HypervisorError(f"libvirt {self.options.uri}: {what}: {_message(exc)}") from exc
        except ET.ParseError as exc:
            raise HypervisorError(f"libvirt {self.options.uri}: {what}: unreadable XML: {exc}") from exc
        except OSError as exc:
            raise HypervisorError(f"libvirt {self.options.uri}: {what}: {exc}") from exc

    def _connection(self) -> Any:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    if self._conn.isAlive():
                        return self._conn
                self._conn = None
            with self._calls("connect"):
                conn = libvirt.open(self.options.uri)
                if self.options.keepalive_seconds and self.options.events:
                    # Keepalives need the event loop; without them a dead daemon is
                    # only noticed at the next call, which then fails and reconnects.
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.setKeepAlive(self.options.keepalive_seconds, 3)
                if self._callbacks:
                    self._register_events(conn)
            self._conn = conn
            return conn

    def _drop_connection(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            self._event_ids = []
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            ids, self._event_ids = self._event_ids, []
            self._callbacks = []
        if conn is not None:
            for cb_id in ids:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(cb_id)
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    # -- listing ---------------------------------------------------------------------------

    def _domains(self) -> list[Any]:
        conn = self._connection()
        with self._calls("list domains"):
            if not self.options.domains:
                return list(conn.listAllDomains(0))
            found = []
            for key in self.options.domains:
                dom = self._lookup(conn, key)
                if dom is not None:
                    found.append(dom)
            return found

    def _lookup(self, conn: Any, key: str, uuid: str | None = None) -> Any | None:
        """The domain named or identified ``key`` (UUID preferred), or ``None``."""
        for how, arg in (("UUID", uuid), ("UUID", key if _looks_like_uuid(key) else None), ("name", key)):
            if arg is None:
                continue
            try:
                return conn.lookupByUUIDString(arg) if how == "UUID" else conn.lookupByName(arg)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return None

    def vms(self) -> list[VMInfo]:
        infos = []
        for dom in self._domains():
            info = self._info(dom)
            if info is not None:
                infos.append(info)
        return infos

    def refresh(self, vm: VMIdentity) -> VMInfo | None:
        conn = self._connection()
        with self._calls(f"look up domain {vm.name!r}"):
            dom = self._lookup(conn, vm.name, vm.uuid)
        return None if dom is None else self._info(dom)

    def _info(self, dom: Any) -> VMInfo | None:
        try:
            name = dom.name()
            uuid = dom.UUIDString()
            active = bool(dom.isActive())
            xml = dom.XMLDesc(0)  # the live XML when running: it has the real socket path
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # undefined between the listing and now
            raise HypervisorError(f"libvirt {self.options.uri}: describe a domain: {_message(exc)}") from exc
        with self._calls(f"domain {name!r} XML"):
            root = ET.fromstring(xml)
        disks = tuple(parse_disks(root, name))
        channel = parse_channel(root, self.options.channel_name)
        extra = {"uri": self.options.uri}
        if active and root.get("id"):
            extra["domain_id"] = root.get("id", "")
        return VMInfo(
            identity=VMIdentity(name, uuid),
            running=active,
            disks=disks,
            channel=self._channel_spec(name, channel, active, extra),
            extra=extra,
        )

    def _channel_spec(
        self, name: str, channel: _Channel | None, active: bool, extra: dict[str, str]
    ) -> ChannelSpec | None:
        if channel is None:
            return None
        try:
            if channel.kind == "unix":
                if channel.path is None:
                    # libvirt picks the path at start; an inactive domain has none yet.
                    extra["channel"] = "virtio-serial port without a socket path until the domain starts"
                    return None
                assert self._channel_cls is not None
                doc = {"path": channel.path}
                if "name" in self._channel_cls.model_fields:
                    doc["name"] = self.options.channel_name
                options = self._channel_cls.model_validate(doc)
                return ChannelSpec(self.options.channel_transport, options)
            if self._vsock_cls is None:
                transport = self.options.vsock_transport
                extra["channel"] = f"vsock CID {channel.cid}, but no transport {transport!r} is installed"
                return None
            options = self._vsock_cls.model_validate({"cid": channel.cid, "port": self.options.vsock_port})
            return ChannelSpec(self.options.vsock_transport, options)
        except ValueError as exc:  # pydantic's ValidationError
            raise HypervisorError(f"libvirt domain {name!r}: channel options do not validate: {exc}") from exc

    # -- safety questions ------------------------------------------------------------------

    def block_jobs(self, vm: VMIdentity, disk: Disk) -> list[str]:
        """Block jobs on the disk's target, plus any domain-wide job (migration,
        snapshot, backup, dump) that may copy the image while we punch it.

        A driver that cannot tell (libvirt's ``test`` driver has no block jobs API) is
        reported as a job: a disk is only punched live when it is proven idle.
        """
        conn = self._connection()
        with self._calls(f"block jobs of {disk.key}"):
            dom = self._lookup(conn, vm.name, vm.uuid)
            if dom is None or not dom.isActive():
                return []
            jobs = []
            if disk.target is None:
                return [f"unknown (disk {disk.key} has no target to ask libvirt about)"]
            try:
                info = dom.blockJobInfo(disk.target, 0)
                if info:
                    jobs.append(f"{_BLOCK_JOB_TYPES.get(info.get('type', 0), 'unknown')} on {disk.target}")
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                jobs.append(f"unknown (this libvirt driver cannot report block jobs: {_message(exc)})")
            try:
                stats = dom.jobStats(0)
                if stats.get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE:
                    operation = _DOMAIN_JOB_OPERATIONS.get(stats.get("operation", 0), "job")
                    jobs.append(f"domain {operation}")
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                jobs.append(f"unknown (this libvirt driver cannot report domain jobs: {_message(exc)})")
            return jobs

    def discard(self, vm: VMIdentity, disk: Disk, ranges: RangeSet) -> None:
        """Discard through QEMU's block layer with HMP ``qemu-io -d DEVICE``.

        The device's own block backend is used (named by its QOM path): a second user of
        the format node would need write permission, which the virtio-blk device does
        not share. A flush follows, so the image's metadata is current on disk.
        """
        conn = self._connection()
        with self._calls(f"discard on {disk.key}"):
            dom = self._lookup(conn, vm.name, vm.uuid)
            if dom is None or not dom.isActive():
                raise HypervisorError(
                    f"libvirt domain {vm.name!r} is not running: nothing to discard through"
                )
            device = self._qdev(dom, disk)
            for r in ranges:
                self._hmp(dom, disk, f'qemu-io -d {device} "discard {r.start} {r.length}"')
            self._hmp(dom, disk, f'qemu-io -d {device} "flush"')

    @staticmethod
    def _hmp(dom: Any, disk: Disk, command: str) -> None:
        import libvirt_qemu

        # HMP answers errors as text, not as a QMP error: any output is a failure.
        reply = libvirt_qemu.qemuMonitorCommand(
            dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
        if reply.strip():
            raise HypervisorError(f"QEMU refused {command!r} on {disk.key}: {reply.strip()}")

    def _qdev(self, dom: Any, disk: Disk) -> str:
        """The QOM path of the device whose medium is the disk's image (``query-block``)."""
        import json

        import libvirt_qemu

        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-block"}', 0))
        for dev in reply.get("return", []):
            inserted = dev.get("inserted") or {}
            files = {inserted.get("file"), (inserted.get("image") or {}).get("filename")}
            if str(disk.path) in files and dev.get("qdev"):
                return str(dev["qdev"])
        raise HypervisorError(f"libvirt domain {dom.name()!r}: no QEMU device has {disk.path} inserted")

    # -- events ----------------------------------------------------------------------------

    def watch(self, callback: VMEventCallback) -> None:
        if not self.options.events:
            raise HypervisorError("libvirt hypervisor: events are disabled in its options (events: false)")
        conn = self._connection()
        with self._lock:
            first = not self._callbacks
            self._callbacks.append(callback)
        if first:
            with self._calls("register for domain events"):
                self._register_events(conn)

    def _register_events(self, conn: Any) -> None:
        wanted = set(self.options.domains)

        def on_lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            try:
                name, uuid = dom.name(), dom.UUIDString()
            except libvirt.libvirtError:
                return
            if wanted and name not in wanted and uuid not in wanted:
                return
            vm_event = VMEvent(
                VMIdentity(name, uuid),
                _EVENT_KINDS.get(event, "changed"),
                _EVENT_NAMES.get(event, str(event)),
            )
            for cb in list(self._callbacks):
                try:
                    cb(vm_event)
                except Exception:  # a failing subscriber must not stop libvirt's event thread
                    log.exception("libvirt event callback failed for %s", vm_event)

        self._event_ids.append(
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
        )


# -- XML -------------------------------------------------------------------------------------


def parse_disks(root: ET.Element, vm: str) -> Iterator[Disk]:
    """The file- and block-backed disks of a domain XML (CD-ROMs and network disks,
    which have no image file on this host, are left out)."""
    for el in root.findall("./devices/disk"):
        if el.get("device", "disk") != "disk":
            continue
        source = el.find("source")
        path = None if source is None else (source.get("file") or source.get("dev"))
        if not path:
            continue
        driver = el.find("driver")
        target = el.find("target")
        serial = el.findtext("serial")
        dev = target.get("dev") if target is not None else None
        fmt = (driver.get("type") if driver is not None else None) or "raw"
        yield Disk(
            vm=vm,
            id=serial or dev or path,
            path=Path(path),
            format=FORMAT_NAMES.get(fmt, fmt),
            passes_discards=driver is not None and driver.get("discard") == "unmap",
            serial=serial,
            target=dev,
        )


def parse_channel(root: ET.Element, name: str = CHANNEL_NAME) -> _Channel | None:
    """The vmreclaim channel of a domain XML: a virtio-serial port named ``name``, else a
    vsock device with a CID."""
    for el in root.findall("./devices/channel"):
        target = el.find("target")
        if el.get("type") == "unix" and target is not None and target.get("name") == name:
            source = el.find("source")
            return _Channel("unix", path=source.get("path") if source is not None else None)
    vsock = root.find("./devices/vsock/cid")
    if vsock is not None and vsock.get("address"):
        with contextlib.suppress(ValueError):
            return _Channel("vsock", cid=int(vsock.get("address", ""), 0))
    return None


# -- `vmreclaim libvirt enable` ----------------------------------------------------------------


@dataclass(frozen=True)
class ChannelChange:
    """The result of adding the vmreclaim channel to a domain's persistent definition."""

    domain: str
    changed: bool
    applied: bool
    diff: str
    channel_xml: str


def channel_xml(name: str = CHANNEL_NAME, path: str | None = None) -> str:
    source = f"<source mode='bind' path={_quote(path)}/>" if path else "<source mode='bind'/>"
    return f"<channel type='unix'>{source}<target type='virtio' name={_quote(name)}/></channel>"


def enable_channel(
    uri: str, domain: str, *, name: str = CHANNEL_NAME, path: str | None = None, dry_run: bool = False
) -> ChannelChange:
    """Add the vmreclaim virtio-serial channel to ``domain``'s persistent definition.

    Nothing changes if it is there already. The running domain, if any, gets the port
    at its next start (a virtio-serial port hot-plugged into a running guest would need
    the guest to rescan). Raises :class:`UsageError` for a transient domain (it has no
    persistent definition) and :class:`HypervisorError` when libvirt refuses.
    """
    _silence_stderr()
    what = f"libvirt {uri}"
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"{what}: connect: {_message(exc)}") from exc
    try:
        try:
            dom = conn.lookupByUUIDString(domain) if _looks_like_uuid(domain) else conn.lookupByName(domain)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise UsageError(f"{what}: no domain named {domain!r}") from exc
            raise HypervisorError(f"{what}: look up {domain!r}: {_message(exc)}") from exc
        try:
            if not dom.isPersistent():
                raise UsageError(
                    f"{what}: domain {domain!r} is transient: it has no persistent definition to change"
                )
            before = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
            root = ET.fromstring(before)
            new_channel = channel_xml(name, path)
            if parse_channel(root, name) is not None and parse_channel(root, name).kind == "unix":  # type: ignore[union-attr]
                return ChannelChange(
                    dom.name(), changed=False, applied=False, diff="", channel_xml=new_channel
                )
            devices = root.find("devices")
            if devices is None:
                devices = ET.SubElement(root, "devices")
            element = ET.fromstring(new_channel)
            devices.append(element)
            ET.indent(root, space="  ")
            after = ET.tostring(root, encoding="unicode") + "\n"
            old = ET.fromstring(before)
            ET.indent(old, space="  ")
            diff = "".join(
                difflib.unified_diff(
                    (ET.tostring(old, encoding="unicode") + "\n").splitlines(keepends=True),
                    after.splitlines(keepends=True),
                    fromfile=f"{dom.name()} (persistent, before)",
                    tofile=f"{dom.name()} (persistent, after)",
                )
            )
            if not dry_run:
                conn.defineXML(after)
            return ChannelChange(
                dom.name(), changed=True, applied=not dry_run, diff=diff, channel_xml=new_channel
            )
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"{what}: domain {domain!r}: {_message(exc)}") from exc
        except ET.ParseError as exc:
            raise HypervisorError(f"{what}: domain {domain!r}: unreadable XML: {exc}") from exc
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


# -- helpers ---------------------------------------------------------------------------------


def _message(exc: Any) -> str:
    return str(exc.get_error_message() or exc)


def _quote(value: str) -> str:
    from xml.sax.saxutils import quoteattr

    return quoteattr(value)


def _looks_like_uuid(key: str) -> bool:
    hexdigits = key.replace("-", "")
    return len(hexdigits) == 32 and all(c in "0123456789abcdefABCDEF" for c in hexdigits)


_STATE_LOCK = threading.Lock()
_EVENT_LOOP_STARTED = False
_SILENCED = False


def _silence_stderr() -> None:
    """libvirt prints every error to stderr by default; ours become HypervisorError."""
    global _SILENCED
    with _STATE_LOCK:
        if not _SILENCED:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _SILENCED = True


def _start_event_loop() -> None:
    """libvirt's default event loop, once per process, in a daemon thread. It must be
    registered before the connection that wants events is opened."""
    global _EVENT_LOOP_STARTED
    with _STATE_LOCK:
        if _EVENT_LOOP_STARTED:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _EVENT_LOOP_STARTED = True
