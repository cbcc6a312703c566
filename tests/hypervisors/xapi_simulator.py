"""A SIMULATOR of the XAPI calls the ``xen`` driver makes — not XenServer, not XAPI.

Xen cannot run on the test machine, so the xen driver's tests talk to this XML-RPC
server instead. It plays only the calls the driver uses, with XAPI's wire shapes as the
``XenAPI`` package expects them (``{"Status": "Success", "Value": ...}`` or
``{"Status": "Failure", "ErrorDescription": [code, ...]}``, a session reference as the
first argument, ``event.from`` with tokens) and XAPI's error codes for the mistakes the
driver can make (``SESSION_AUTHENTICATION_FAILED``, ``SESSION_INVALID``,
``HANDLE_INVALID``, ``UUID_INVALID``, ``MAP_DUPLICATE_KEY``). Its behaviour was written
from the XenAPI documentation and the ``XenAPI`` client library; it has not been compared
with a real pool, and passing tests against it prove the driver's logic, not its
compatibility with XenServer or XCP-ng.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

Record = dict[str, Any]


class _Server(ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    allow_reuse_address = True


class _Quiet(SimpleXMLRPCRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # no request lines on the test output


class XapiFailure(Exception):
    """Raised by a simulated call: becomes a XAPI ``Failure`` response."""

    def __init__(self, *description: str) -> None:
        self.description = list(description)


class XapiSimulator:
    """An in-process XML-RPC server playing a one-host XAPI pool (see module doc)."""

    def __init__(self, username: str = "root", password: str = "xapi-pass") -> None:
        self.username, self.password = username, password
        self.vms: dict[str, Record] = {}
        self.vbds: dict[str, Record] = {}
        self.vdis: dict[str, Record] = {}
        self.srs: dict[str, Record] = {}
        self.sessions: set[str] = set()
        self.calls: list[str] = []
        self._events: list[tuple[int, Record]] = []
        self._counter = itertools.count(1)
        self._cond = threading.Condition()
        self._fail: dict[str, list[str]] = {}
        self._garble: set[str] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- the pool --------------------------------------------------------------------------

    @staticmethod
    def _ref() -> str:
        return f"OpaqueRef:{uuid.uuid4()}"

    def add_sr(self, type: str, name: str = "") -> str:
        ref = self._ref()
        self.srs[ref] = {"uuid": str(uuid.uuid4()), "type": type, "name_label": name or type}
        return ref

    def add_vm(
        self,
        name: str,
        power_state: str = "Running",
        disks: list[tuple[str, str]] = (),  # type: ignore[assignment]
        *,
        raw: tuple[str, ...] = (),
        cdrom: bool = False,
        **fields: Any,
    ) -> str:
        """A VM with one VBD per ``(sr_ref, userdevice)``; userdevices in ``raw`` get a
        raw VDI (``sm_config: {type: raw}``); ``cdrom`` adds an empty CD drive."""
        ref = self._ref()
        vbd_refs = []
        for sr_ref, userdevice in disks:
            vdi_ref = self._ref()
            self.vdis[vdi_ref] = {
                "uuid": str(uuid.uuid4()),
                "SR": sr_ref,
                "virtual_size": str(10 * 2**30),
                "sm_config": {"type": "raw"} if userdevice in raw else {"vhd-blocks": "eJz7/x8AAAQ="},
                "current_operations": {},
            }
            vbd_ref = self._ref()
            self.vbds[vbd_ref] = {
                "VM": ref,
                "VDI": vdi_ref,
                "type": "Disk",
                "empty": False,
                "userdevice": userdevice,
                "device": "",
            }
            vbd_refs.append(vbd_ref)
        if cdrom:
            vbd_ref = self._ref()
            self.vbds[vbd_ref] = {"VM": ref, "VDI": "OpaqueRef:NULL", "type": "CD", "empty": True,
                                  "userdevice": "3", "device": ""}  # fmt: skip
            vbd_refs.append(vbd_ref)
        record = {
            "uuid": str(uuid.uuid4()),
            "name_label": name,
            "power_state": power_state,
            "is_a_template": False,
            "is_a_snapshot": False,
            "is_control_domain": False,
            "domid": 7 if power_state in ("Running", "Paused") else -1,
            "VBDs": vbd_refs,
            "xenstore_data": {},
            "current_operations": {},
            **fields,
        }
        self.vms[ref] = record
        self._event(ref, "add")
        return ref

    def set_power_state(self, ref: str, state: str) -> None:
        self.vms[ref]["power_state"] = state
        self._event(ref, "mod")

    def destroy_vm(self, ref: str) -> None:
        record = self.vms.pop(ref)
        for vbd in record["VBDs"]:
            self.vbds.pop(vbd, None)
        self._event(ref, "del", record)

    def fail_next(self, method: str, *description: str) -> None:
        """Make the next call of ``method`` fail with the XAPI error ``description``."""
        self._fail.setdefault(method, []).extend(["\0".join(description)])

    def garble(self, method: str) -> None:
        """Make every call of ``method`` answer with something that is not a XAPI
        result (a broken server or proxy)."""
        self._garble.add(method)

    def _event(self, ref: str, op: str, snapshot: Record | None = None) -> None:
        with self._cond:
            snap = dict(snapshot if snapshot is not None else self.vms[ref])
            self._events.append(
                (next(self._counter), {"class": "vm", "operation": op, "ref": ref, "snapshot": snap})
            )
            self._cond.notify_all()

    # -- serving ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> XapiSimulator:
        self._server = _Server(("127.0.0.1", 0), requestHandler=_Quiet, allow_none=True, logRequests=False)
        self._server.register_instance(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="xapi-simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> Any:
        self.calls.append(method)
        if method in self._garble:
            # Not a XAPI result struct at all. (A struct without "Status" would make
            # XenAPI 26.21.1 itself raise TypeError while building its fault message.)
            return "garbled"
        queued = self._fail.get(method)
        if queued:
            return {"Status": "Failure", "ErrorDescription": queued.pop(0).split("\0")}
        handler: Callable[..., Any] | None = self._handlers().get(method)
        if handler is None:
            return {"Status": "Failure", "ErrorDescription": ["MESSAGE_METHOD_UNKNOWN", method]}
        try:
            if method != "session.login_with_password":
                session, *rest = params
                if session not in self.sessions:
                    raise XapiFailure("SESSION_INVALID", str(session))
                params = tuple(rest)
            return {"Status": "Success", "Value": handler(*params)}
        except XapiFailure as exc:
            return {"Status": "Failure", "ErrorDescription": exc.description}

    def _handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            "session.login_with_password": self._login,
            "session.logout": self._logout,
            "VM.get_all_records": lambda: dict(self.vms),
            "VM.get_record": lambda ref: self._get(self.vms, ref),
            "VM.get_by_uuid": self._vm_by_uuid,
            "VM.get_by_name_label": lambda name: [r for r, v in self.vms.items() if v["name_label"] == name],
            "VM.add_to_xenstore_data": self._add_xenstore,
            "VM.remove_from_xenstore_data": self._remove_xenstore,
            "VBD.get_record": lambda ref: self._get(self.vbds, ref),
            "VDI.get_record": lambda ref: self._get(self.vdis, ref),
            "SR.get_record": lambda ref: self._get(self.srs, ref),
            "event.from": self._event_from,
        }

    def _login(self, user: str, password: str, version: str, originator: str) -> str:
        if user != self.username or password != self.password:
            raise XapiFailure("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        ref = self._ref()
        self.sessions.add(ref)
        return ref

    def _logout(self) -> str:
        return ""

    @staticmethod
    def _get(table: dict[str, Record], ref: str) -> Record:
        if ref not in table:
            raise XapiFailure("HANDLE_INVALID", "ref", ref)
        return table[ref]

    def _vm_by_uuid(self, uid: str) -> str:
        for ref, vm in self.vms.items():
            if vm["uuid"] == uid:
                return ref
        raise XapiFailure("UUID_INVALID", "VM", uid)

    def _add_xenstore(self, ref: str, key: str, value: str) -> str:
        data = self._get(self.vms, ref)["xenstore_data"]
        if key in data:
            raise XapiFailure("MAP_DUPLICATE_KEY", "VM", "xenstore_data", ref, key)
        data[key] = value
        self._event(ref, "mod")
        return ""

    def _remove_xenstore(self, ref: str, key: str) -> str:
        self._get(self.vms, ref)["xenstore_data"].pop(key, None)
        return ""

    def _event_from(self, classes: list[str], token: str, timeout: float) -> Record:
        if "vm" not in classes:
            raise XapiFailure("EVENTS_LOST")
        with self._cond:
            if token == "":
                # XAPI answers an empty token with the current state of every object.
                events = [{"class": "vm", "operation": "add", "ref": r, "snapshot": dict(v)}
                          for r, v in self.vms.items()]  # fmt: skip
                last = self._events[-1][0] if self._events else 0
                return {"events": events, "valid_ref_counts": {}, "token": str(last)}
            since = int(token)
            self._cond.wait_for(lambda: any(n > since for n, _ in self._events), timeout=float(timeout))
            fresh = [ev for n, ev in self._events if n > since]
            last = self._events[-1][0] if self._events else since
            return {"events": fresh, "valid_ref_counts": {}, "token": str(last)}
