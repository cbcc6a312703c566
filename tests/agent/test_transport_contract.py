"""Every built-in transport driver passes the transport contract (vmreclaim.testing),
each over its real channel: a Unix socket, TCP on loopback with its secret, a
virtio-serial port played by a pseudo-terminal behind a socket (QEMU's part), and vsock
where the kernel has a loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tty
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vmreclaim.core import loader
from vmreclaim.testing import TransportContract

SECRET = "correct horse battery staple"


def test_every_builtin_transport_is_under_contract() -> None:
    builtin = {d.name for d in loader.installed("transports") if d.distribution == "vmreclaim"}
    assert builtin == {"unix", "tcp", "virtio-serial", "vsock"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TestUnix(TransportContract):
    driver = "unix"

    def channel(self, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"path": str(tmp_path / "vm.sock")}, {"path": str(tmp_path / "vm.sock")}

    def nowhere(self, tmp_path: Path) -> dict[str, Any]:
        return {"path": str(tmp_path / "nobody.sock")}


class TestTcp(TransportContract):
    driver = "tcp"

    def channel(self, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        opts = {"port": free_port(), "secret": SECRET, "handshake_timeout": 5}
        return opts, opts

    def nowhere(self, tmp_path: Path) -> dict[str, Any]:
        return {"port": free_port(), "secret": SECRET}


class TestVirtioSerial(TransportContract):
    """The guest opens a pseudo-terminal (a character device like the port); the host
    connects to a Unix socket where a relay plays QEMU, copying bytes to the terminal."""

    driver = "virtio-serial"

    @pytest.fixture(autouse=True)
    def _port(self, tmp_path: Path) -> Any:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        yield
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def channel(self, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        host = {"path": str(tmp_path / "qemu.sock"), "retry_seconds": 0.05}
        device = os.ttyname(self.slave)
        # Only the guest may hold the port open, or its close would not reach the relay.
        os.close(self.slave)
        self.slave = -1
        return host, {"device": device, "connect_timeout": 2}

    def nowhere(self, tmp_path: Path) -> dict[str, Any]:
        return {"device": str(tmp_path / "no-such-port"), "connect_timeout": 1}

    @contextlib.asynccontextmanager
    async def hypervisor(self, tmp_path: Path) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        master = self.master
        os.set_blocking(master, False)

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            done = asyncio.Event()

            def readable() -> None:
                try:
                    data = os.read(master, 1 << 16)
                except BlockingIOError:
                    return
                except OSError:  # EIO: the guest closed its end
                    data = b""
                if data:
                    writer.write(data)
                else:
                    loop.remove_reader(master)
                    done.set()

            loop.add_reader(master, readable)
            try:
                while chunk := await reader.read(1 << 16):
                    view = memoryview(chunk)
                    while view:
                        try:
                            view = view[os.write(master, view) :]
                        except BlockingIOError:
                            await asyncio.sleep(0.001)
                await done.wait()
            finally:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(master)
                writer.close()

        server = await asyncio.start_unix_server(relay, str(tmp_path / "qemu.sock"))
        try:
            yield
        finally:
            server.close()


class TestVsock(TransportContract):
    """vsock's host end hands a connection to the VM whose CID it came from; on this
    machine's loopback every peer is CID 1, which is never a VM, so the channel tests
    need a real guest (tests/guest) and only the static part of the contract runs here."""

    driver = "vsock"

    def channel(self, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        pytest.skip("vsock needs a guest with a CID of its own (see tests/guest)")

    def nowhere(self, tmp_path: Path) -> dict[str, Any]:
        pytest.skip("vsock needs a guest with a CID of its own (see tests/guest)")
