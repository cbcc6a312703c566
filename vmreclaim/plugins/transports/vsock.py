"""Transport ``vsock``: AF_VSOCK stream sockets between a guest and its host.

* **Guest side** (:meth:`connect`): connect to ``(cid, port)``, ``cid`` 2 being the host.
* **Host side** (:meth:`serve`): one listening socket per ``port`` serves every VM; each
  accepted connection goes to the channel whose ``cid`` is the peer's CID, and a
  connection from a CID no channel claims is closed. The CID is trustworthy: the host
  kernel's vhost-vsock only delivers guest packets whose source CID is the one the host
  assigned to that VM (DESIGN.md section 4, rule 5), so a guest cannot speak as another.

Not yet run against a real vsock: the reference machine has no ``/dev/vhost-vsock`` and
no loopback transport. The tests run the driver's stream setup over a socket pair and
its error mapping against the kernel's real AF_VSOCK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import ClassVar

from pydantic import Field

from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.errors import ChannelError
from vmreclaim.core.transports import MAX_LINE_BYTES, ConnectionHandler, Transport

log = logging.getLogger("vmreclaim.transports.vsock")

AF_VSOCK = getattr(socket, "AF_VSOCK", 40)
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2


class VsockOptions(DriverOptions):
    #: The vsock port (the same on both sides).
    port: int = Field(default=4855, ge=1, le=0xFFFFFFFE)
    #: Guest side: the CID to connect to (2, the host). Host side: the VM's CID.
    cid: int = Field(default=VMADDR_CID_HOST, ge=2, le=0xFFFFFFFE)


class _Listener:
    """One listening socket for a port, shared by every VM's channel on that port."""

    registry: ClassVar[dict[tuple[int, int], _Listener]] = {}

    def __init__(self, port: int) -> None:
        self.port = port
        self.handlers: dict[int, ConnectionHandler] = {}
        self.server: asyncio.Server | None = None

    @classmethod
    async def get(cls, port: int) -> _Listener:
        key = (id(asyncio.get_running_loop()), port)
        listener = cls.registry.get(key)
        if listener is None:
            listener = cls(port)
            await listener.start()
            cls.registry[key] = listener
        return listener

    async def start(self) -> None:
        sock = socket.socket(AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((VMADDR_CID_ANY, self.port))
            sock.listen(64)
            sock.setblocking(False)
            self.server = await asyncio.start_server(self._accepted, sock=sock, limit=MAX_LINE_BYTES)
        except OSError as exc:
            sock.close()
            raise ChannelError(f"cannot listen on vsock port {self.port}: {exc.strerror or exc}") from exc

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        cid = peer[0] if isinstance(peer, tuple) and peer else -1
        await self.dispatch(reader, writer, cid)

    async def dispatch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        """Hand a connection to the channel of VM ``cid``, or close it."""
        handler = self.handlers.get(cid)
        if handler is None:
            log.warning(
                "vsock port %d: connection from CID %d, which no configured VM has; closed", self.port, cid
            )
            writer.close()
            return
        try:
            await handler(reader, writer, f"vsock:cid={cid}")
        finally:
            writer.close()

    async def remove(self, cid: int) -> None:
        self.handlers.pop(cid, None)
        if not self.handlers and self.server is not None:
            self.server.close()
            self.registry.pop((id(asyncio.get_running_loop()), self.port), None)


class VsockTransport(Transport):
    """AF_VSOCK: the guest connects to the host's CID; the host tells VMs apart by CID."""

    Options = VsockOptions
    options: VsockOptions

    def describe(self) -> str:
        return f"vsock:cid={self.options.cid},port={self.options.port}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            sock = socket.socket(AF_VSOCK, socket.SOCK_STREAM)
        except OSError as exc:
            raise ChannelError(f"this kernel has no AF_VSOCK sockets: {exc.strerror or exc}") from exc
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.options.cid, self.options.port))
        except OSError as exc:
            sock.close()
            raise ChannelError(f"cannot connect to {self.describe()}: {exc.strerror or exc}") from exc
        return await open_stream(sock)

    async def serve(self, handler: ConnectionHandler) -> None:
        listener = await _Listener.get(self.options.port)
        cid = self.options.cid
        if cid in listener.handlers:
            raise ChannelError(f"vsock CID {cid} port {self.options.port} is configured for two channels")
        listener.handlers[cid] = handler
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            await listener.remove(cid)


async def open_stream(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Line-framed asyncio streams over a connected stream socket (any family)."""
    try:
        return await asyncio.open_connection(sock=sock, limit=MAX_LINE_BYTES)
    except OSError as exc:
        with contextlib.suppress(OSError):
            sock.close()
        raise ChannelError(f"cannot use the connected socket: {exc.strerror or exc}") from exc
