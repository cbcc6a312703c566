"""The transport plugin kind: the byte channel between one guest agent and the host.

A transport driver (entry-point group ``vmreclaim.transports``) subclasses
:class:`Transport` and works on both ends of a channel with asyncio streams:

* in the guest, :meth:`Transport.connect` opens the channel to the host;
* on the host, :meth:`Transport.serve` hands every connection of the channel to the
  daemon, until cancelled.

One configured channel belongs to one VM: the host knows which VM speaks from the
channel the hypervisor wired to it (a per-VM socket, a vsock CID), never from what the
guest sends (DESIGN.md section 4, rule 5). A transport that cannot guarantee this on its
own (``tcp``) must authenticate the peer with a per-VM secret before it hands the
connection over. What travels on the channel is docs/protocol.md's JSON lines; framing
above bytes is not the transport's business.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

from vmreclaim.core.driver import Driver

#: Called by :meth:`Transport.serve` for each connection: (reader, writer, peer), where
#: ``peer`` describes the other end for logs ("unix:/run/vm1.sock", "vsock:cid=42").
ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]]

#: Lines on a channel are bounded (docs/protocol.md); asyncio's reader limit enforces it.
MAX_LINE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TransportCapabilities:
    """What a transport guarantees; checked by the core and the runtimes."""

    #: The channel itself proves which VM is on the other end (unix socket wired by the
    #: hypervisor, vsock CID). False means the transport authenticates with a secret.
    identifies_vm: bool = True
    #: The host end listens (True) or connects to a socket the hypervisor listens on.
    host_listens: bool = True


class Transport(Driver):
    """Base class of transport drivers."""

    kind = "transports"
    capabilities: ClassVar[TransportCapabilities] = TransportCapabilities()

    @abstractmethod
    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Guest side: open the channel to the host.

        Raise :class:`~vmreclaim.core.errors.ChannelError` when it cannot be opened;
        the agent retries with backoff.
        """

    @abstractmethod
    async def serve(self, handler: ConnectionHandler) -> None:
        """Host side: pass every connection of this channel to ``handler``.

        Runs until cancelled; cleans up what it created (a socket file) when it is.
        Raise :class:`~vmreclaim.core.errors.ChannelError` if the channel cannot be set up.
        """

    def describe(self) -> str:
        """A short label for logs and ``vmreclaim status``."""
        return type(self).__name__
