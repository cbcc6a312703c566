"""Transport ``virtio-serial``: a virtio-serial port (``/dev/virtio-ports/NAME``).

The hypervisor wires one port per VM to a Unix socket on the host (QEMU ``-chardev
socket,...,server=on`` + ``-device virtserialport,name=NAME``; libvirt ``<channel
type='unix'><target type='virtio' name='NAME'/>``), so the socket a line arrives on
names the VM (DESIGN.md section 4, rule 5).

* **Guest side** (:meth:`connect`): open the port's character device. There is no
  connection to make, but the kernel says whether the host end is connected: while it
  is not, ``poll`` reports ``POLLHUP`` and reads return end-of-file. So ``connect``
  waits (up to ``connect_timeout``) for the host end, and end-of-file later means the
  host went away — the agent reconnects like on any other transport. Without udev the
  ``/dev/virtio-ports`` links may be missing: the port is then found by its name under
  ``/sys/class/virtio-ports``. A tty (a plain serial line, ``/dev/ttyS1``) works too: it
  is switched to raw mode so the line discipline neither echoes nor edits.
* **Host side** (:meth:`serve`): the hypervisor listens on ``path``; the host connects,
  hands the connection over, and connects again when it ends (the VM rebooted or the
  agent closed the port), until cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import termios
import tty
from pathlib import Path

from pydantic import Field

from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.errors import ChannelError
from vmreclaim.core.transports import MAX_LINE_BYTES, ConnectionHandler, Transport, TransportCapabilities

PORTS_DIR = Path("/dev/virtio-ports")
SYS_PORTS = Path("/sys/class/virtio-ports")


class VirtioSerialOptions(DriverOptions):
    #: The port's name (``<target name=...>``).
    name: str = Field(default="org.vmreclaim.0", min_length=1, max_length=255)
    #: Guest side: the character device, if not ``/dev/virtio-ports/<name>``.
    device: Path | None = None
    #: Host side: the Unix socket the hypervisor listens on for this VM's port.
    path: Path | None = None
    #: Guest side: how long to wait for the host end to connect before retrying.
    connect_timeout: float = Field(default=5.0, gt=0, le=300)
    #: Host side: delay between attempts to connect to ``path``.
    retry_seconds: float = Field(default=1.0, gt=0, le=300)


class VirtioSerialTransport(Transport):
    """A virtio-serial port: the guest opens the device, the host connects to QEMU's socket."""

    Options = VirtioSerialOptions
    options: VirtioSerialOptions
    capabilities = TransportCapabilities(identifies_vm=True, host_listens=False)

    def describe(self) -> str:
        if self.options.path is not None:
            return f"virtio-serial:{self.options.name} via {self.options.path}"
        return f"virtio-serial:{self.options.device or self.options.name}"

    # -- guest -------------------------------------------------------------------------------

    def device(self) -> Path:
        """The port's device: configured, the udev link, or found by name in sysfs."""
        if self.options.device is not None:
            return self.options.device
        link = PORTS_DIR / self.options.name
        if link.exists():
            return link
        with contextlib.suppress(OSError):
            for port in SYS_PORTS.iterdir():
                with contextlib.suppress(OSError):
                    if (port / "name").read_text().strip() == self.options.name:
                        return Path("/dev") / port.name
        raise ChannelError(
            f"no virtio-serial port named {self.options.name!r} ({link} is missing and no "
            f"{SYS_PORTS}/*/name matches)"
        )

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = self.device()
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ChannelError(f"cannot open {path}: {exc.strerror or exc}") from exc
        try:
            if os.isatty(fd):
                tty.setraw(fd, termios.TCSANOW)
            await self._wait_for_host(fd, path)
            return await open_char_device(fd)
        except BaseException:
            os.close(fd)
            raise

    async def _wait_for_host(self, fd: int, path: Path) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLOUT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.connect_timeout
        while True:
            hung_up = any(ev & select.POLLHUP for _, ev in poller.poll(0))
            if not hung_up:
                return
            if loop.time() >= deadline:
                waited = self.options.connect_timeout
                raise ChannelError(f"{path}: host end of the port not connected (waited {waited:.0f} s)")
            await asyncio.sleep(0.2)

    # -- host --------------------------------------------------------------------------------

    async def serve(self, handler: ConnectionHandler) -> None:
        path = self.options.path
        if path is None:
            raise ChannelError(
                f"virtio-serial port {self.options.name!r}: no 'path' (the hypervisor's socket)"
            )
        peer = self.describe()
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
            except OSError:
                await asyncio.sleep(self.options.retry_seconds)
                continue
            try:
                await handler(reader, writer, peer)
            finally:
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()
            await asyncio.sleep(self.options.retry_seconds)


class _PortWriter(asyncio.streams.FlowControlMixin):
    """Write side of a port: flow control for ``drain``, and closing it closes the read
    side too (one port, one connection)."""

    def __init__(self, read_transport: asyncio.ReadTransport) -> None:
        super().__init__()
        self.read_transport = read_transport
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.read_transport.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self.closed


async def open_char_device(fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a character device ``fd`` (non-blocking). One descriptor is
    read and a duplicate written, because each pipe transport owns and closes its file."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    wfd = os.dup(fd)
    rfile = os.fdopen(fd, "rb", buffering=0)
    wfile = os.fdopen(wfd, "wb", buffering=0)
    try:
        read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rfile)
    except BaseException:
        rfile.close()
        wfile.close()
        raise
    try:
        transport, protocol = await loop.connect_write_pipe(lambda: _PortWriter(read_transport), wfile)
    except BaseException:
        read_transport.close()
        wfile.close()
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
