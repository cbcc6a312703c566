"""Hypervisor ``xen``: XenServer / XCP-ng VMs through XenAPI (extra ``[xen]``).

The host daemon runs in dom0 (or next to a pool master) and asks XAPI, through the
``XenAPI`` package, for every VM with its VBDs → VDIs → SRs. A VDI of a file-based SR
(``ext``, ``nfs``, ``file``, ``smb``) is the file
``/var/run/sr-mount/<sr-uuid>/<vdi-uuid>.vhd`` (``.raw`` for raw VDIs); VDIs on LVM
SRs live inside logical volumes and are left out (their "file" offsets are LV offsets,
and freeing them needs thin provisioning).

Xen has no per-VM socket a guest could be identified by, so the channel is ``tcp``
with a per-VM secret: the driver gives each VM its own port and a random secret and
provisions both through the VM's xenstore data (``VM.add_to_xenstore_data``: keys
``vm-data/vmreclaim/{secret,port,address}``, which XAPI writes under the VM's own
``/local/domain/<domid>`` where only that domain and dom0 can read them). A guest
cannot learn another guest's secret, so it cannot speak for it (DESIGN.md section 4,
rule 5). XAPI copies xenstore data into xenstore when the VM starts: a VM running when
its secret is first provisioned sees it after its next reboot.

Running state is ``power_state`` (``Running`` and ``Paused`` count: tapdisk holds the
image open). Block jobs are the ``current_operations`` of the VM and of the VDI
(snapshot, clone, copy, migrate, mirror, resize). Events come from ``event.from``.

This driver has been tested against a simulator of the XAPI calls it uses
(``tests/hypervisors/xapi_simulator.py``), **not against a real XenServer or XCP-ng
pool**. Every ``XenAPI.Failure``, XML-RPC fault and ``OSError`` becomes a
:class:`~vmreclaim.core.errors.HypervisorError` here.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import secrets
import threading
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.errors import HypervisorError
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

try:
    import XenAPI
except ImportError as _exc:  # the loader reports this as "failed to load", naming the extra
    raise ImportError("the xen hypervisor driver needs XenAPI: pip install 'vmreclaim[xen]'") from _exc

log = logging.getLogger(__name__)

#: SR types whose VDIs are files under ``/var/run/sr-mount/<sr-uuid>/``.
FILE_SR_TYPES = frozenset({"ext", "nfs", "file", "smb", "cifs"})
#: The xenstore keys (relative to the VM's domain) the guest agent reads.
XENSTORE_PREFIX = "vm-data/vmreclaim"
SECRET_KEY = f"{XENSTORE_PREFIX}/secret"
PORT_KEY = f"{XENSTORE_PREFIX}/port"
ADDRESS_KEY = f"{XENSTORE_PREFIX}/address"
#: Operations that read or rewrite a VDI behind tapdisk's back, or copy it.
BUSY_OPERATIONS = frozenset(
    {"snapshot", "clone", "copy", "checkpoint", "migrate_send", "pool_migrate", "mirror", "resize",
     "resize_online", "export", "revert", "suspend", "data_destroy"}
)  # fmt: skip


class XenOptions(DriverOptions):
    #: XAPI's URL (``https://pool-master``), or ``local`` for dom0's UNIX socket.
    url: str = Field(default="local", min_length=1)
    username: str = "root"
    password: str | None = None
    #: A file holding the password (first line), instead of ``password``.
    password_file: Path | None = None
    #: Accept a self-signed certificate on the pool master.
    ignore_ssl: bool = False
    #: VMs to serve by name label or UUID; empty: every VM that is not a template,
    #: a snapshot or the control domain.
    vms: list[str] = Field(default_factory=list)
    #: Where file-based SRs are mounted.
    sr_mount: Path = Path("/var/run/sr-mount")
    #: Transport of the channel and where the host listens for VM agents.
    channel_transport: str = "tcp"
    #: The address the daemon listens on, and the one the agents are told to connect
    #: to (``agent_address``, default the same).
    listen_address: str = "0.0.0.0"
    agent_address: str | None = None
    #: VM channels get ports from here upward (one port per VM).
    port_base: int = Field(default=5230, ge=1, le=65535)
    port_count: int = Field(default=1000, ge=1, le=65535)
    #: Write each VM's secret and port into its xenstore data (else they must be
    #: there already).
    provision: bool = True
    #: Seconds an XAPI call may take.
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _one_password(self) -> XenOptions:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if self.port_base + self.port_count - 1 > 65535:
            raise ValueError(f"port_base {self.port_base} + port_count {self.port_count} passes 65535")
        return self


class XenHypervisor(Hypervisor):
    """VMs of one XenServer / XCP-ng host (or pool) through XenAPI."""

    Options = XenOptions
    options: XenOptions
    capabilities: ClassVar[HypervisorCapabilities] = HypervisorCapabilities(
        block_jobs=True, live_state=True, events=True
    )

    def __init__(self, options: DriverOptions | None = None) -> None:
        super().__init__(options)
        self._channel_model = channel_options_model(self.options.channel_transport, "xen hypervisor")
        self._lock = threading.RLock()
        self._session: Any = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- XAPI plumbing ---------------------------------------------------------------------

    def _password(self) -> str:
        if self.options.password_file is not None:
            try:
                return self.options.password_file.read_text().splitlines()[0]
            except (OSError, IndexError) as exc:
                raise HypervisorError(f"XAPI password file {self.options.password_file}: {exc}") from exc
        return self.options.password or ""

    def _login(self) -> Any:
        if self.options.url == "local":
            session = XenAPI.xapi_local()
        else:
            session = XenAPI.Session(
                self.options.url,
                transport=_transport(self.options.url, self.options.timeout_seconds, self.options.ignore_ssl),
                ignore_ssl=self.options.ignore_ssl,
            )
        session.xenapi.login_with_password(self.options.username, self._password(), "1.0", "vmreclaim")
        return session

    @contextlib.contextmanager
    def _xapi(self, what: str) -> Iterator[Any]:
        """The logged-in ``session.xenapi`` under the lock; errors mapped, naming ``what``."""
        where = f"XAPI {self.options.url}"
        with self._lock:
            try:
                if self._session is None:
                    self._session = self._login()
                yield self._session.xenapi
            except XenAPI.Failure as exc:
                raise HypervisorError(f"{where}: {what}: {' '.join(map(str, exc.details))}") from exc
            except xmlrpc.client.Fault as exc:
                self._session = None
                raise HypervisorError(
                    f"{where}: {what}: XML-RPC fault {exc.faultCode}: {exc.faultString}"
                ) from exc
            except (xmlrpc.client.ProtocolError, http.client.HTTPException) as exc:
                self._session = None
                raise HypervisorError(f"{where}: {what}: {exc}") from exc
            except OSError as exc:
                self._session = None
                raise HypervisorError(f"{where}: {what}: {exc}") from exc

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=self.options.timeout_seconds)
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(Exception):  # logging out of a dead session is moot
                session.xenapi.session.logout()

    # -- listing ---------------------------------------------------------------------------

    def _wanted(self, record: dict[str, Any]) -> bool:
        if record.get("is_a_template") or record.get("is_a_snapshot") or record.get("is_control_domain"):
            return False
        wanted = self.options.vms
        return not wanted or record.get("name_label") in wanted or record.get("uuid") in wanted

    def vms(self) -> list[VMInfo]:
        with self._xapi("list VMs") as x:
            records = x.VM.get_all_records()
            found = [(ref, rec) for ref, rec in records.items() if self._wanted(rec)]
            if self.options.provision:
                self._provision_all(x, found)
            return [self._info(x, ref, rec) for ref, rec in sorted(found, key=lambda p: p[1]["name_label"])]

    def refresh(self, vm: VMIdentity) -> VMInfo | None:
        with self._xapi(f"look up VM {vm.name!r}") as x:
            ref = self._lookup(x, vm)
            if ref is None:
                return None
            try:
                record = x.VM.get_record(ref)
            except XenAPI.Failure as exc:
                if exc.details and exc.details[0] == "HANDLE_INVALID":
                    return None  # destroyed between the lookup and now
                raise
            if not self._wanted(record):
                return None
            if self.options.provision:
                self._provision_all(x, [(ref, record)])
                record = x.VM.get_record(ref)
            return self._info(x, ref, record)

    def _lookup(self, x: Any, vm: VMIdentity) -> str | None:
        if vm.uuid:
            try:
                return str(x.VM.get_by_uuid(vm.uuid))
            except XenAPI.Failure as exc:
                if not exc.details or exc.details[0] != "UUID_INVALID":
                    raise
                return None
        refs = x.VM.get_by_name_label(vm.name)
        return str(refs[0]) if len(refs) == 1 else None

    def _info(self, x: Any, ref: str, record: dict[str, Any]) -> VMInfo:
        name = str(record["name_label"])
        running = record.get("power_state") in ("Running", "Paused")
        disks = []
        skipped = []
        for vbd_ref in record.get("VBDs", []):
            vbd = x.VBD.get_record(vbd_ref)
            if (
                vbd.get("type") != "Disk"
                or vbd.get("empty")
                or vbd.get("VDI") in (None, "", "OpaqueRef:NULL")
            ):
                continue
            vdi = x.VDI.get_record(vbd["VDI"])
            sr = x.SR.get_record(vdi["SR"])
            device = vbd.get("device") or _device_name(vbd.get("userdevice", ""))
            if sr.get("type") not in FILE_SR_TYPES:
                skipped.append(f"{device}: SR {sr.get('uuid')} of type {sr.get('type')!r} is not file-based")
                continue
            raw = (vdi.get("sm_config") or {}).get("type") == "raw"
            path = self.options.sr_mount / str(sr["uuid"]) / f"{vdi['uuid']}.{'raw' if raw else 'vhd'}"
            disks.append(
                Disk(
                    vm=name,
                    id=device,
                    path=path,
                    format="raw" if raw else "vhd",
                    passes_discards=False,
                    target=device,
                )
            )
        data = record.get("xenstore_data") or {}
        extra = {"vm_ref": ref, "power_state": str(record.get("power_state", ""))}
        if record.get("domid", -1) not in (-1, "-1"):
            extra["domid"] = str(record.get("domid"))
        if skipped:
            extra["skipped_disks"] = "; ".join(skipped)
        return VMInfo(
            identity=VMIdentity(name, str(record["uuid"])),
            running=running,
            disks=tuple(disks),
            channel=self._channel(name, data),
            extra=extra,
        )

    # -- the per-VM tcp channel ------------------------------------------------------------

    def _channel(self, name: str, data: dict[str, str]) -> ChannelSpec | None:
        secret, port = data.get(SECRET_KEY), data.get(PORT_KEY)
        if not secret or not port or not port.isdigit():
            return None
        fields = self._channel_model.model_fields
        doc: dict[str, Any] = {"port": int(port), "secret": secret}
        for key in ("address", "host"):
            if key in fields:
                doc[key] = self.options.listen_address
                break
        try:
            return ChannelSpec(self.options.channel_transport, self._channel_model.model_validate(doc))
        except ValueError as exc:
            raise HypervisorError(f"Xen VM {name!r}: channel options do not validate: {exc}") from exc

    def _provision_all(self, x: Any, found: list[tuple[str, dict[str, Any]]]) -> None:
        """Give every VM without one a port of its own and a fresh secret, in its
        xenstore data. Ports already given (to any VM) are never handed out twice."""
        taken = set()
        for rec in x.VM.get_all_records().values():
            port = (rec.get("xenstore_data") or {}).get(PORT_KEY, "")
            if port.isdigit():
                taken.add(int(port))
        free = (
            p
            for p in range(self.options.port_base, self.options.port_base + self.options.port_count)
            if p not in taken
        )
        for ref, rec in found:
            data = rec.get("xenstore_data") or {}
            if data.get(SECRET_KEY) and data.get(PORT_KEY, "").isdigit():
                continue
            port = next(free, None)
            if port is None:
                raise HypervisorError(
                    f"no free channel port left in {self.options.port_base}-"
                    f"{self.options.port_base + self.options.port_count - 1} for VM {rec['name_label']!r}"
                )
            secret = secrets.token_hex(32)
            for key in (SECRET_KEY, PORT_KEY, ADDRESS_KEY):
                with contextlib.suppress(XenAPI.Failure):  # a missing key cannot be removed
                    x.VM.remove_from_xenstore_data(ref, key)
            x.VM.add_to_xenstore_data(ref, SECRET_KEY, secret)
            x.VM.add_to_xenstore_data(ref, PORT_KEY, str(port))
            x.VM.add_to_xenstore_data(
                ref, ADDRESS_KEY, self.options.agent_address or self.options.listen_address
            )
            data = {**data, SECRET_KEY: secret, PORT_KEY: str(port)}
            rec["xenstore_data"] = data
            log.info("provisioned channel port %d and a secret for Xen VM %s", port, rec["name_label"])

    # -- safety questions ------------------------------------------------------------------

    def block_jobs(self, vm: VMIdentity, disk: Disk) -> list[str]:
        with self._xapi(f"operations on {disk.key}") as x:
            ref = self._lookup(x, vm)
            if ref is None:
                return []
            record = x.VM.get_record(ref)
            jobs = [
                f"VM {op}"
                for op in (record.get("current_operations") or {}).values()
                if op in BUSY_OPERATIONS
            ]
            for vbd_ref in record.get("VBDs", []):
                vbd = x.VBD.get_record(vbd_ref)
                if (vbd.get("device") or _device_name(vbd.get("userdevice", ""))) != disk.id:
                    continue
                vdi = x.VDI.get_record(vbd["VDI"])
                jobs += [f"VDI {op}" for op in (vdi.get("current_operations") or {}).values()]
            return jobs

    # -- events ----------------------------------------------------------------------------

    def watch(self, callback: VMEventCallback) -> None:
        """Follow VM records with ``event.from`` in a thread with its own session."""
        if self._watcher is not None:
            raise HypervisorError("xen hypervisor: watch() was already called")
        with self._xapi("read the event token") as x:
            # With an empty token XAPI answers with every current record: that is the
            # starting state, not news, so it only sets the token.
            first = _event_from(x, "", 0.0)
            token = str(first.get("token", ""))
            states = {
                str(ev.get("ref")): (ev.get("snapshot") or {}).get("power_state")
                for ev in first.get("events", [])
            }

        def loop() -> None:
            nonlocal token
            session = None
            while not self._stop.is_set():
                try:
                    if session is None:
                        session = self._login()
                    batch = _event_from(session.xenapi, token, 1.0)
                except Exception as exc:  # XAPI gone: log, wait, log in again
                    log.warning("XAPI %s: event.from failed: %s", self.options.url, exc)
                    session = None
                    self._stop.wait(min(5.0, self.options.timeout_seconds))
                    continue
                token = batch.get("token", token)
                for ev in batch.get("events", []):
                    kind = self._event_kind(ev, states)
                    snapshot = ev.get("snapshot") or {}
                    if kind is None or (snapshot and not self._wanted(snapshot)):
                        continue
                    vm = VMIdentity(str(snapshot.get("name_label", ev.get("ref"))), snapshot.get("uuid"))
                    try:
                        callback(VMEvent(vm, kind, str(ev.get("operation", ""))))
                    except Exception:  # a failing subscriber must not stop the watcher
                        log.exception("xen event callback failed")
            if session is not None:
                with contextlib.suppress(Exception):
                    session.xenapi.session.logout()

        self._watcher = threading.Thread(target=loop, name="xapi-events", daemon=True)
        self._watcher.start()

    @staticmethod
    def _event_kind(ev: dict[str, Any], states: dict[str, Any]) -> str | None:
        ref, op = str(ev.get("ref", "")), ev.get("operation")
        if op == "add":
            states[ref] = (ev.get("snapshot") or {}).get("power_state")
            return "defined"
        if op == "del":
            states.pop(ref, None)
            return "undefined"
        before = states.get(ref)
        now = (ev.get("snapshot") or {}).get("power_state")
        states[ref] = now
        running = {"Running", "Paused"}
        if now in running and before not in running:
            return "started"
        if before in running and now not in running:
            return "stopped"
        return "changed"


def _event_from(xenapi: Any, token: str, timeout: float) -> dict[str, Any]:
    """``event.from(["vm"], token, timeout)`` (``from`` is a Python keyword)."""
    result: dict[str, Any] = getattr(xenapi.event, "from")(["vm"], token, timeout)
    return result


def _device_name(userdevice: str) -> str:
    """XAPI's ``userdevice`` ``"0"`` → ``xvda`` (the name the guest sees)."""
    if userdevice.isdigit() and int(userdevice) < 26:
        return "xvd" + chr(ord("a") + int(userdevice))
    return f"userdevice{userdevice}"


def _transport(url: str, timeout: float, ignore_ssl: bool) -> xmlrpc.client.Transport:
    """An XML-RPC transport whose connections time out (xmlrpc's never do)."""
    if url.startswith("https:"):
        import ssl

        context = ssl._create_unverified_context() if ignore_ssl else ssl.create_default_context()

        class _Safe(xmlrpc.client.SafeTransport):
            def make_connection(self, host: Any) -> http.client.HTTPSConnection:
                conn = super().make_connection(host)
                conn.timeout = timeout
                return conn

        return _Safe(context=context)

    class _Plain(xmlrpc.client.Transport):
        def make_connection(self, host: Any) -> http.client.HTTPConnection:
            conn = super().make_connection(host)
            conn.timeout = timeout
            return conn

    return _Plain()


__all__ = ["XenHypervisor", "XenOptions"]
