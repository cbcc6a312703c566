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
from pathlib import Path

from pydantic import Field

from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.errors import ChannelError
from vmreclaim.core.transports import MAX_LINE_BYTES, ConnectionHandler, Transport


class UnixOptions(DriverOptions):
    path: Path
    mode: int = Field(default=0o600, ge=0, le=0o777)


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

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await handler(reader, writer, peer)

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()
            server = await asyncio.start_unix_server(on_connect, path, limit=MAX_LINE_BYTES)
            os.chmod(path, self.options.mode)
        except OSError as exc:
            raise ChannelError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        try:
            async with server:
                await server.serve_forever()
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
