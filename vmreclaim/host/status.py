"""``vmreclaim status``: the running daemon's state over its status socket.

The daemon listens on ``status_socket`` (a Unix socket, mode 0600); a client connects,
writes one line (``status``), and reads one JSON document (DESIGN.md section 8)::

    {"vms": [{"name", "running", "disks": [{"id", "path", "format", "pending_bytes",
              "punched_bytes", "freed_bytes", "last_reclaim", ...}], ...}],
     "policy": {"driver", ...its state}, "rejected_records", ...}

``last_reclaim`` is Unix time in seconds (``null`` if never). Fields beyond the
contract (requested and verified bytes, the last decision and outcome, the agent) are
there for people and may grow; none is ever removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vmreclaim.core.errors import ChannelError, UsageError

#: Where ``vmreclaim status`` looks without ``--config`` (the example configuration's
#: path); ``VMRECLAIM_STATUS_SOCKET`` overrides it.
DEFAULT_STATUS_SOCKET = Path("/run/vmreclaim/status.sock")
#: A status document larger than this is refused by the client (a broken daemon).
MAX_STATUS_BYTES = 64 * 1024 * 1024


def status_socket_path(config: str | os.PathLike[str] | None) -> Path:
    """The status socket of the host configuration ``config``, or the default one."""
    if config is not None:
        from vmreclaim.core.config import HostConfig, load_config

        return load_config(Path(config), HostConfig).status_socket
    env = os.environ.get("VMRECLAIM_STATUS_SOCKET")
    return Path(env) if env else DEFAULT_STATUS_SOCKET


def query_status(path: str | os.PathLike[str], timeout: float = 10.0) -> dict[str, Any]:
    """Ask the daemon listening on ``path`` for its status document."""
    path = Path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ChannelError(
                f"no host daemon status socket at {path} (is `vmreclaim host` running? "
                "pass its --config to find its status_socket)"
            ) from None
        except OSError as exc:
            raise ChannelError(f"cannot reach the host daemon at {path}: {exc.strerror or exc}") from exc
        chunks = []
        received = 0
        try:
            sock.sendall(b"status\n")
            while chunk := sock.recv(1 << 20):
                chunks.append(chunk)
                received += len(chunk)
                if received > MAX_STATUS_BYTES:
                    raise ChannelError(f"status from {path} exceeds {MAX_STATUS_BYTES} bytes")
        except TimeoutError:
            raise ChannelError(f"host daemon at {path} did not answer within {timeout:.0f}s") from None
        except OSError as exc:
            raise ChannelError(f"reading status from {path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        doc = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChannelError(f"status from {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or "vms" not in doc:
        raise ChannelError(f"status from {path} is not a vmreclaim status document")
    return doc


class StatusServer:
    """Answers every connection on the status socket with ``document()``."""

    def __init__(self, path: Path, document: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.path = path
        self.document = document
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"status_socket {path}: cannot create its directory: {exc.strerror}") from exc
        if path.is_socket() or path.exists():
            if _answers(path):
                raise UsageError(f"status_socket {path}: another vmreclaim host daemon is listening there")
            if not path.is_socket():
                raise UsageError(f"status_socket {path}: exists and is not a socket")
            path.unlink()
        try:
            self._server = await asyncio.start_unix_server(self._handle, path)
            os.chmod(path, 0o600)
        except OSError as exc:
            raise UsageError(f"status_socket {path}: cannot listen: {exc.strerror or exc}") from exc

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(TimeoutError, ValueError, asyncio.IncompleteReadError):
                await asyncio.wait_for(reader.readline(), 2.0)
            doc = await self.document()
            writer.write(json.dumps(doc).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is None:
            return  # never listened: the socket there (if any) is someone else's
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def _answers(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()
