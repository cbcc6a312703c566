"""Transport ``tcp``: TCP with a per-VM shared secret, for guests with no better channel.

A TCP peer's address says nothing trustworthy about which VM it is (a guest chooses its
own IP), so the VM is identified by a secret only it and the host know (DESIGN.md
section 4, rule 5), one port per VM on the host. Both ends prove the secret before any
protocol line is exchanged (so neither a stranger nor a fake host gets to speak), and
every line afterwards carries an HMAC under a key derived from it (so a line cannot be
injected, replayed or reordered on the wire). The exact exchange is in
docs/protocol.md, *Transports*. The channel is authenticated, not encrypted.

Why not TLS: TLS with a pre-shared key needs Python 3.13's ``ssl`` PSK callbacks (the
guest may have 3.11), and certificates per VM are more to provision than a secret
file; HMAC-SHA256 from the standard library covers what the protocol needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import secrets
import stat
import string
import time
from collections import deque
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator

from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.errors import ChannelError
from vmreclaim.core.transports import MAX_LINE_BYTES, ConnectionHandler, Transport, TransportCapabilities

log = logging.getLogger("vmreclaim.transports.tcp")

GREETING = b"VMRECLAIM-TCP 1 "
#: A secret must carry at least this much entropy (estimated, see :func:`secret_bits`).
MIN_SECRET_BITS = 128
#: ... and use at least this many distinct symbols ("0" * 64 is long, not secret).
MIN_SECRET_SYMBOLS = 8
#: Connections of one VM's port that may be in the handshake at once; more are closed at
#: once (idle connections must not hold descriptors or buffers, issue 11 item 4).
MAX_PENDING_HANDSHAKES = 4
#: Failed handshakes of one VM's port per minute; past that the port closes every new
#: connection at once until the oldest failure is a minute old (a guesser gets a few
#: tries a minute, and the log a few lines).
HANDSHAKE_FAILURES_PER_MINUTE = 8
#: Handshake lines are short ("NONCE MAC"); the raw stream's own buffer is this small so
#: that a connection that has not proved the secret holds almost nothing.
_HANDSHAKE_LIMIT = 4096
_MAC_HEX = 64
#: How a handshake can fail: the peer hangs up, is slow, sends junk or the wrong proof.
_HANDSHAKE_ERRORS = (
    OSError,
    TimeoutError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ChannelError,
)
#: A framed line: MAC, space, the protocol line.
_RAW_LIMIT = MAX_LINE_BYTES + _MAC_HEX + 1


class TcpOptions(DriverOptions):
    #: The host's address: the host listens on it, the agent connects to it.
    address: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(ge=1, le=65535)
    #: The VM's secret, inline (at least 128 bits: ``openssl rand -hex 16`` or more) ...
    secret: SecretStr | None = None
    #: ... or in a file readable by its owner only.
    secret_file: Path | None = None
    handshake_timeout: float = Field(default=10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _one_secret(self) -> TcpOptions:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of 'secret' and 'secret_file'")
        if self.secret is not None:
            problem = weak_secret(self.secret.get_secret_value().encode())
            if problem is not None:
                raise ValueError(f"'secret' {problem}")
        return self


_CLASSES = [
    set(string.digits.encode()),
    set(b"0123456789abcdef"),
    set(b"0123456789ABCDEF"),
    set((string.ascii_lowercase + string.digits).encode()),
    set((string.ascii_letters + string.digits + "+/-_=").encode()),  # base64, base64url
    set(string.printable.encode()),
]


def secret_bits(secret: bytes) -> float:
    """An upper estimate of a secret's entropy: its length times the bits per symbol of
    the smallest usual alphabet holding all its symbols (decimal, hex, lower-case
    alphanumerics, base64, printable ASCII, bytes). It cannot see a dictionary word, but
    it catches the short and the hand-typed: 32 hex digits are 128 bits, 16 letters 75."""
    used = set(secret)
    size = next((len(c) for c in _CLASSES if used <= c), 256)
    return len(secret) * math.log2(size)


def weak_secret(secret: bytes) -> str | None:
    """Why ``secret`` is too weak to stand for a VM's identity, or ``None``."""
    bits = secret_bits(secret)
    if bits < MIN_SECRET_BITS:
        return (
            f"carries about {bits:.0f} bits, under the {MIN_SECRET_BITS} bits required "
            "(use 32 or more random hex digits: openssl rand -hex 16)"
        )
    if len(set(secret)) < MIN_SECRET_SYMBOLS:
        return (
            f"uses {len(set(secret))} distinct symbols: not {MIN_SECRET_BITS} bits of entropy "
            "(use random hex digits: openssl rand -hex 16)"
        )
    return None


class TcpTransport(Transport):
    """TCP, authenticated both ways with the VM's secret, every line MACed."""

    Options = TcpOptions
    options: TcpOptions
    capabilities = TransportCapabilities(identifies_vm=False, host_listens=True)

    def describe(self) -> str:
        return f"tcp:{self.options.address}:{self.options.port}"

    def secret(self) -> bytes:
        if self.options.secret is not None:
            return self.options.secret.get_secret_value().encode()
        path = self.options.secret_file
        assert path is not None
        try:
            st = os.stat(path)
            data = path.read_bytes().strip()
        except OSError as exc:
            raise ChannelError(f"tcp secret file {path}: {exc.strerror or exc}") from exc
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ChannelError(f"tcp secret file {path} is accessible to group or others (chmod 600 it)")
        problem = weak_secret(data)
        if problem is not None:
            raise ChannelError(f"tcp secret file {path}: the secret {problem}")
        return data

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        secret = self.secret()
        try:
            reader, writer = await asyncio.open_connection(
                self.options.address, self.options.port, limit=_HANDSHAKE_LIMIT
            )
        except OSError as exc:
            raise ChannelError(f"cannot connect to {self.describe()}: {exc.strerror or exc}") from exc
        try:
            key = await asyncio.wait_for(
                guest_handshake(reader, writer, secret), self.options.handshake_timeout
            )
        except _HANDSHAKE_ERRORS as exc:
            writer.close()
            raise ChannelError(f"{self.describe()}: handshake failed: {exc or type(exc).__name__}") from exc
        return wrap(reader, writer, key, send=b"g", recv=b"h")

    async def serve(self, handler: ConnectionHandler) -> None:
        secret = self.secret()
        pending = 0
        failures: deque[float] = deque()
        locked_logged = False

        def locked_out() -> bool:
            now = time.monotonic()
            while failures and now - failures[0] > 60:
                failures.popleft()
            return len(failures) >= HANDSHAKE_FAILURES_PER_MINUTE

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal pending, locked_logged
            peer = writer.get_extra_info("peername")
            where = f"tcp:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "tcp"
            if locked_out() or pending >= MAX_PENDING_HANDSHAKES:
                # Closed before a byte is read: it costs this port a descriptor for an
                # instant, and the log a line per lockout, not per connection.
                if failures and not locked_logged and locked_out():
                    locked_logged = True
                    log.warning(
                        "%s: %d failed handshakes within a minute: refusing connections for a while",
                        self.describe(),
                        len(failures),
                    )
                writer.transport.abort()
                return
            locked_logged = False
            pending += 1
            try:
                key = await asyncio.wait_for(
                    host_handshake(reader, writer, secret), self.options.handshake_timeout
                )
            except _HANDSHAKE_ERRORS as exc:
                failures.append(time.monotonic())
                if len(failures) <= 2:  # the first of a burst; the lockout says the rest
                    log.warning("%s on %s: refused: %s", where, self.describe(), exc or type(exc).__name__)
                writer.transport.abort()
                return
            finally:
                pending -= 1
            app_reader, app_writer = wrap(reader, writer, key, send=b"h", recv=b"g")
            try:
                await handler(app_reader, app_writer, where)
            finally:
                app_writer.close()

        try:
            server = await asyncio.start_server(
                on_connect, self.options.address, self.options.port, limit=_HANDSHAKE_LIMIT
            )
        except OSError as exc:
            raise ChannelError(f"cannot listen on {self.describe()}: {exc.strerror or exc}") from exc
        async with server:
            await server.serve_forever()


# -- handshake --------------------------------------------------------------------------------


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


async def _line(reader: asyncio.StreamReader, limit: int = 256) -> bytes:
    line = await reader.readuntil(b"\n")
    if len(line) > limit:
        raise ChannelError("handshake line too long")
    return line.rstrip(b"\n")


def _unhex(text: bytes, what: str) -> bytes:
    try:
        value = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ChannelError(f"handshake: {what} is not hex") from None
    if len(value) != 32:
        raise ChannelError(f"handshake: {what} is not 32 bytes")
    return value


async def host_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> bytes:
    """Host side: challenge the guest, check its answer, prove ourselves; the session key."""
    nonce_h = secrets.token_bytes(32)
    writer.write(GREETING + nonce_h.hex().encode() + b"\n")
    await writer.drain()
    answer = (await _line(reader)).split(b" ")
    if len(answer) != 2:
        raise ChannelError("handshake: the guest's answer is not 'NONCE MAC'")
    nonce_g, mac_g = _unhex(answer[0], "guest nonce"), _unhex(answer[1], "guest MAC")
    if not hmac.compare_digest(mac_g, _mac(secret, b"guest", nonce_h, nonce_g)):
        raise ChannelError("the guest does not know this VM's secret")
    writer.write(_mac(secret, b"host", nonce_g, nonce_h).hex().encode() + b"\n")
    await writer.drain()
    return _mac(secret, b"session", nonce_h, nonce_g)


async def guest_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> bytes:
    """Guest side: answer the challenge, check the host's proof; the session key."""
    greeting = await _line(reader)
    if not greeting.startswith(GREETING):
        raise ChannelError("the peer is not a vmreclaim host (no greeting)")
    nonce_h = _unhex(greeting[len(GREETING) :], "host nonce")
    nonce_g = secrets.token_bytes(32)
    writer.write(
        nonce_g.hex().encode() + b" " + _mac(secret, b"guest", nonce_h, nonce_g).hex().encode() + b"\n"
    )
    await writer.drain()
    mac_h = _unhex(await _line(reader), "host MAC")
    if not hmac.compare_digest(mac_h, _mac(secret, b"host", nonce_g, nonce_h)):
        raise ChannelError("the host does not know this VM's secret")
    return _mac(secret, b"session", nonce_h, nonce_g)


# -- MACed lines ----------------------------------------------------------------------------


class _MacTransport(asyncio.Transport):
    """Write side: each protocol line goes out as ``MAC line``."""

    def __init__(self, raw: asyncio.StreamWriter, key: bytes, direction: bytes) -> None:
        super().__init__()
        self.raw = raw
        self.key = key
        self.direction = direction
        self.counter = 0
        self.buffer = b""
        #: The task checking incoming lines; kept here so it lives as long as the stream.
        self.pump: asyncio.Task[None] | None = None
        #: Cleared by the protocol reader when its buffer is full (``pause_reading``):
        #: the pump then stops reading the socket, so a peer whose lines are not being
        #: consumed is held back by TCP itself (read-side flow control).
        self.readable = asyncio.Event()
        self.readable.set()

    def pause_reading(self) -> None:
        self.readable.clear()

    def resume_reading(self) -> None:
        self.readable.set()

    def is_reading(self) -> bool:
        return self.readable.is_set()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += bytes(data)
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            mac = _mac(self.key, self.direction, self.counter.to_bytes(8, "big"), line).hex().encode()
            self.counter += 1
            self.raw.write(mac + b" " + line + b"\n")

    def close(self) -> None:
        self.raw.close()

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    def abort(self) -> None:
        self.raw.transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self.raw.transport.get_write_buffer_size()

    def can_write_eof(self) -> bool:
        return False


class _RawFlow(asyncio.BaseProtocol):
    """What ``StreamWriter`` asks of its protocol, answered by the raw connection."""

    def __init__(self, raw: asyncio.StreamWriter) -> None:
        super().__init__()
        self.raw = raw
        self.closed: asyncio.Future[None] | None = None

    async def _drain_helper(self) -> None:
        await self.raw.drain()

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        if self.closed is None:
            self.closed = asyncio.ensure_future(self._wait_closed())
        return self.closed

    async def _wait_closed(self) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            await self.raw.wait_closed()


def wrap(
    raw_reader: asyncio.StreamReader,
    raw_writer: asyncio.StreamWriter,
    key: bytes,
    *,
    send: bytes,
    recv: bytes,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Protocol streams over an authenticated connection: lines are MACed going out and
    checked coming in; a line that fails its check closes the connection."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    transport = _MacTransport(raw_writer, key, send)
    # The reader pauses this transport when it holds more than twice its limit.
    reader.set_transport(transport)
    writer = asyncio.StreamWriter(transport, _RawFlow(raw_writer), reader, loop)

    async def pump() -> None:
        # Framed lines are split here rather than with the raw reader's readuntil, so
        # that the raw stream keeps the handshake's small buffer: a connection holds at
        # most one partial framed line (bounded) plus the protocol reader's buffer.
        counter = 0
        pending = bytearray()
        scanned = 0
        try:
            while True:
                await transport.readable.wait()
                chunk = await raw_reader.read(1 << 16)
                if not chunk:
                    break
                pending += chunk
                while (nl := pending.find(b"\n", scanned)) >= 0:
                    framed = bytes(pending[:nl])
                    del pending[: nl + 1]
                    scanned = 0
                    mac, _, line = framed.partition(b" ")
                    want = _mac(key, recv, counter.to_bytes(8, "big"), line).hex().encode()
                    if not hmac.compare_digest(mac, want):
                        log.error(
                            "tcp: line %d fails its MAC (injected, replayed or reordered): closing", counter
                        )
                        return
                    counter += 1
                    reader.feed_data(line + b"\n")
                scanned = len(pending)
                if scanned > _RAW_LIMIT:
                    log.error("tcp: a line of more than %d bytes: closing", _RAW_LIMIT)
                    return
        except (OSError, ConnectionError) as exc:
            log.info("tcp: connection ended: %s", exc or type(exc).__name__)
        finally:
            reader.feed_eof()
            raw_writer.close()

    transport.pump = loop.create_task(pump())
    return reader, writer
