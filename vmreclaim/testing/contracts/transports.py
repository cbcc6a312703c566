"""The transport contract: what the agent and the host daemon rely on from every
transport driver, over a real channel.

Subclass :class:`TransportContract` as ``Test<Something>``, set ``driver`` and implement
:meth:`~TransportContract.channel` (the host's and the guest's options of one channel)
and :meth:`~TransportContract.nowhere` (guest options that lead to no host)::

    class TestUnix(TransportContract):
        driver = "unix"

        def channel(self, tmp_path):
            return {"path": str(tmp_path / "vm.sock")}, {"path": str(tmp_path / "vm.sock")}

        def nowhere(self, tmp_path):
            return {"path": str(tmp_path / "nobody.sock")}

A transport whose host end connects to the hypervisor (``host_listens = False``, like
virtio-serial) also overrides :meth:`~TransportContract.hypervisor`, an async context
manager that plays the hypervisor's part and yields once it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from vmreclaim.core import loader
from vmreclaim.core.errors import ChannelError
from vmreclaim.core.transports import Transport, TransportCapabilities

T = TypeVar("T")
#: Every step of the suite must finish within this (a hang is a failure, not a stall).
TIMEOUT = 20.0
#: A line far above a socket buffer and below the protocol's limit.
BIG = 1 << 20


def _run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


class TransportContract:
    """Every transport driver: lines cross both ways intact, the host learns a peer
    label, failures are :class:`ChannelError`, and ``serve`` cleans up when cancelled."""

    #: The driver's entry-point name in ``vmreclaim.transports``.
    driver: ClassVar[str]

    def channel(self, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """(host options, guest options) of one working channel; ``pytest.skip`` if none here."""
        raise NotImplementedError

    def nowhere(self, tmp_path: Path) -> dict[str, Any]:
        """Guest options of a channel with nothing at the other end."""
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def hypervisor(self, tmp_path: Path) -> AsyncIterator[None]:
        """The hypervisor's part of the channel, if the transport needs one."""
        yield

    def make(self, options: dict[str, Any]) -> Transport:
        cls = loader.driver_class("transports", self.driver)
        return loader.load_driver("transports", self.driver, Transport, cls.Options.model_validate(options))

    def test_is_installed_as_a_transport(self) -> None:
        cls = loader.driver_class("transports", self.driver)
        assert issubclass(cls, Transport)
        assert isinstance(cls.capabilities, TransportCapabilities)

    def test_describe_names_the_channel(self, tmp_path: Path) -> None:
        host_opts, guest_opts = self.channel(tmp_path)
        for opts in (host_opts, guest_opts):
            label = self.make(opts).describe()
            assert isinstance(label, str) and label.strip() and "\n" not in label

    def test_lines_cross_both_ways_intact(self, tmp_path: Path) -> None:
        host_opts, guest_opts = self.channel(tmp_path)
        host, guest = self.make(host_opts), self.make(guest_opts)
        big = bytes(range(33, 127)) * (BIG // 94) + b"\n"
        seen: dict[str, Any] = {}

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
            seen["peer"] = peer
            seen["first"] = await reader.readline()
            seen["big"] = await reader.readexactly(len(big))
            writer.write(b"welcome\n" + big)
            await writer.drain()
            # Not waiting for the guest's close: a virtio-serial port does not pass it on.
            await asyncio.Event().wait()

        async def scenario() -> tuple[bytes, bytes]:
            async with self.hypervisor(tmp_path):
                server = asyncio.create_task(host.serve(handler))
                try:
                    reader, writer = await self._connect(guest, server)
                    writer.write(b'{"type": "hello"}\n' + big)
                    await writer.drain()
                    answer = await reader.readline()
                    back = await reader.readexactly(len(big))
                    writer.close()
                    return answer, back
                finally:
                    server.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await server

        answer, back = _run(scenario())
        assert answer == b"welcome\n" and back == big
        assert seen["first"] == b'{"type": "hello"}\n' and seen["big"] == big
        assert isinstance(seen["peer"], str) and seen["peer"].strip()

    def test_no_host_is_a_channel_error(self, tmp_path: Path) -> None:
        guest = self.make(self.nowhere(tmp_path))
        with pytest.raises(ChannelError):
            _run(guest.connect())

    def test_serve_stops_when_cancelled(self, tmp_path: Path) -> None:
        host_opts, guest_opts = self.channel(tmp_path)
        host, guest = self.make(host_opts), self.make(guest_opts)

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
            writer.close()

        async def scenario() -> None:
            async with self.hypervisor(tmp_path):
                server = asyncio.create_task(host.serve(handler))
                await asyncio.sleep(0.2)
                server.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await server
                assert server.cancelled() or server.exception() is None
            if host.capabilities.host_listens:
                with pytest.raises(ChannelError):
                    await guest.connect()

        _run(scenario())

    @staticmethod
    async def _connect(
        guest: Transport, server: asyncio.Task[None]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect as the agent does: retry while the host end comes up."""
        while True:
            if server.done():
                server.result()  # serve() failed: show why
            try:
                return await guest.connect()
            except ChannelError:
                await asyncio.sleep(0.05)
