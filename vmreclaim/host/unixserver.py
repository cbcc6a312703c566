"""The daemon's own local sockets (status and control): one way to listen on them.

A socket path that another daemon still answers on is never taken over (two daemons
sharing one database would both punch); a stale socket left by a killed daemon is
replaced; the socket is created 0600 with no moment of a looser mode; and on close the
file is removed only by the server that listened on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


def answers(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


class UnixSocketServer(ABC):
    """A Unix socket server of the daemon; subclasses answer one connection in
    :meth:`handle`. ``what`` names the socket in errors (the config key, or a phrase)."""

    #: How the socket is named in error messages.
    what = "socket"
    #: The stream reader's line limit.
    limit = 64 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        from vmreclaim.core.errors import UsageError

        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{self.what} {path}: cannot create its directory: {exc.strerror}") from exc
        if path.is_socket() or path.exists():
            if answers(path):
                raise UsageError(f"{self.what} {path}: another vmreclaim host daemon is listening there")
            if not path.is_socket():
                raise UsageError(f"{self.what} {path}: exists and is not a socket")
            path.unlink()
        old = os.umask(0o177)  # never a moment with a looser mode
        try:
            self._server = await asyncio.start_unix_server(self._serve, path, limit=self.limit)
            os.chmod(path, 0o600)
        except OSError as exc:
            raise UsageError(f"{self.what} {path}: cannot listen: {exc.strerror or exc}") from exc
        finally:
            os.umask(old)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.handle(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @abstractmethod
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one connection (closing it is the server's job)."""

    async def close(self) -> None:
        if self._server is None:
            return  # never listened: the socket there (if any) is someone else's
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def exchange(sock: socket.socket, request: bytes, limit: int, what: str, path: Path) -> dict[str, Any]:
    """Send ``request`` on the connected ``sock`` and read the daemon's one JSON object
    to the end of the stream, at most ``limit`` bytes; ``what`` names it in errors.

    A timeout is left to the caller (``TimeoutError``): what it means differs by socket.
    """
    from vmreclaim.core.errors import ChannelError

    chunks = []
    received = 0
    sock.sendall(request)
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
        received += len(chunk)
        if received > limit:
            raise ChannelError(f"{what} from {path} exceeds {limit} bytes")
    try:
        doc = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChannelError(f"{what} from {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ChannelError(f"{what} from {path} is not a JSON object")
    return doc
