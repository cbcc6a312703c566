"""Transport ``unix``: a Unix stream socket per VM.

The host listens on ``path`` (created with mode 0600 by default, so only root can speak
as the VM); the agent connects to it. This is the channel used by tests that run the
agent on the host against a loop-mounted image, and by hypervisors that hand a guest a
socket of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

from pydantic import Field

from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.errors import ChannelError
from vmreclaim.core.transports import MAX_LINE_BYTES, ConnectionHandler, Transport


class UnixOptions(DriverOptions):
    path: Path
    mode: int = Field(default=0o600, ge=0, le=0o777)
    #: Connections served at once; further ones wait in the kernel's listen backlog,
    #: unaccepted (no descriptor, no buffer in the daemon), until one ends.
    max_connections: int = Field(default=4, ge=1, le=1024)


class UnixTransport(Transport):
    """A Unix stream socket: the host listens at ``path``, the agent connects."""

    Options = UnixOptions
    options: UnixOptions

    def describe(self) -> str:
        return f"unix:{self.options.path}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(self.options.path, limit=MAX_LINE_BYTES)
        except OSError as exc:
            raise ChannelError(f"cannot connect to {self.options.path}: {exc.strerror or exc}") from exc

    async def serve(self, handler: ConnectionHandler) -> None:
        path = self.options.path
        peer = self.describe()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            os.chmod(path, self.options.mode)
            sock.listen(16)
            sock.setblocking(False)
        except OSError as exc:
            raise ChannelError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        # Accepting is gated, not just capped: a connection over the limit is never
        # accepted, so a guest that opens thousands of idle connections on its channel
        # fills its own listen backlog and costs the daemon nothing (issue 11 item 4).
        slots = asyncio.Semaphore(self.options.max_connections)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        async def serve_one(conn: socket.socket) -> None:
            try:
                reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_LINE_BYTES)
                try:
                    await handler(reader, writer, peer)
                finally:
                    writer.close()
            except OSError:
                conn.close()
            finally:
                slots.release()

        try:
            while True:
                await slots.acquire()
                try:
                    conn, _ = await loop.sock_accept(sock)
                except BaseException:
                    slots.release()
                    raise
                task = loop.create_task(serve_one(conn))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            sock.close()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(OSError):
                path.unlink()
