"""The daemon's control socket: ``vmreclaim reclaim VM`` and ``vmreclaim report``.

Unlike the status socket, a request here makes the daemon act (reconcile, punch), so
the socket is mode 0600 *and* every peer's credentials (``SO_PEERCRED``) must be root
or the daemon's own user: a socket file's mode alone can be loosened by a mistaken
``chmod`` or a bind mount. One request per connection, one JSON line each way::

    → {"op": "reclaim", "vm": "vm1", "disk": null, "dry_run": false, "wait": true}
    ← {"ok": true, "result": {"vm": "vm1", "disks": [...]}}
    → {"op": "report"}
    ← {"ok": true, "result": {"vms": [...]}}
    ← {"ok": false, "error": "VM 'vm9' is not served by this host daemon", "exit": 2}

Requests are bounded (64 KiB) and validated like any other input.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from vmreclaim.core.errors import ChannelError, ImageBusyError, ImageError, UsageError, VMReclaimError
from vmreclaim.host.logs import bug
from vmreclaim.host.unixserver import UnixSocketServer, exchange

MAX_REQUEST_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReclaimRequest(_Request):
    op: Literal["reclaim"] = "reclaim"
    vm: str = Field(min_length=1, max_length=256)
    disk: str | None = Field(default=None, min_length=1, max_length=256)
    dry_run: bool = False
    wait: bool = False


class ReportRequest(_Request):
    op: Literal["report"] = "report"


Request = Annotated[ReclaimRequest | ReportRequest, Field(discriminator="op")]
_REQUEST: TypeAdapter[Any] = TypeAdapter(Request)

Handler = Callable[[Any], Awaitable[dict[str, Any]]]


def control_socket_path(status_socket: Path) -> Path:
    """The control socket lies beside the status socket (``control.sock``)."""
    return status_socket.with_name("control.sock")


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class ControlServer(UnixSocketServer):
    """Serves control requests with ``handler`` (see the module docstring)."""

    what = "control socket"
    limit = MAX_REQUEST_BYTES

    def __init__(self, path: Path, handler: Handler) -> None:
        super().__init__(path)
        self.handler = handler

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = _peer_uid(sock) if sock is not None else -1
        if uid not in (0, os.geteuid()):
            await _answer(
                writer, {"ok": False, "error": f"uid {uid} may not control this daemon", "exit": 2}
            )
            return
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            request = _REQUEST.validate_json(line, strict=True)
        except (TimeoutError, ValueError, asyncio.LimitOverrunError, ValidationError) as exc:
            await _answer(writer, {"ok": False, "error": f"bad control request: {exc}"[:2000], "exit": 2})
            return
        try:
            result = await self.handler(request)
        except VMReclaimError as exc:
            await _answer(writer, {"ok": False, "error": str(exc), "exit": exc.exit_code})
            return
        except Exception as exc:
            bug("a control request failed", exc)
            await _answer(writer, {"ok": False, "error": f"internal error: {exc}", "exit": 1})
            return
        await _answer(writer, {"ok": True, "result": result})




async def _answer(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
    writer.write(json.dumps(doc).encode() + b"\n")
    await writer.drain()


#: The daemon's refusal comes back as the error class of its exit code.
_BY_EXIT: dict[int, type[VMReclaimError]] = {2: UsageError, 3: ImageBusyError, 4: ImageError}


def ask(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one control request to the daemon at ``path`` and return its result."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise UsageError(
                f"no host daemon control socket at {path} (is `vmreclaim host` running? pass its --config)"
            ) from None
        except PermissionError:
            raise UsageError(f"control socket {path}: permission denied (only root may use it)") from None
        except OSError as exc:
            raise UsageError(f"cannot reach the host daemon at {path}: {exc.strerror or exc}") from exc
        try:
            doc = exchange(sock, json.dumps(request).encode() + b"\n", MAX_ANSWER_BYTES, "answer", path)
        except TimeoutError:
            raise ChannelError(f"host daemon at {path} did not answer within {timeout:.0f}s") from None
    finally:
        sock.close()
    if "ok" not in doc:
        raise ChannelError(f"answer from {path} is not a vmreclaim control answer")
    if not doc["ok"]:
        code = doc.get("exit", 1)
        raise _BY_EXIT.get(code if isinstance(code, int) else 1, VMReclaimError)(str(doc.get("error")))
    result = doc.get("result")
    if not isinstance(result, dict):
        raise ChannelError(f"answer from {path} has no result")
    return result
