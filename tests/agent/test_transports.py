"""Transport drivers: unix, virtio-serial (over a pseudo-terminal and a real socket),
vsock (stream setup over a socket pair, errors from the kernel's real AF_VSOCK), tcp
(handshake, wrong secrets, tampered and replayed lines through a meddling proxy)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from vmreclaim.core.errors import ChannelError, ProtocolError
from vmreclaim.core.lines import read_line
from vmreclaim.core.loader import driver_class, load_driver
from vmreclaim.core.transports import MAX_LINE_BYTES, Transport
from vmreclaim.plugins.transports import tcp, vsock
from vmreclaim.plugins.transports.virtio_serial import VirtioSerialTransport

SECRET = "correct horse battery staple"


def make(name: str, **options: Any) -> Transport:
    cls = driver_class("transports", name)
    return load_driver("transports", name, Transport, cls.Options.model_validate(options))


def run(coro: Awaitable[Any], timeout: float = 20) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_every_transport_is_installed() -> None:
    classes = {name: driver_class("transports", name) for name in ("unix", "virtio-serial", "vsock", "tcp")}
    for cls in classes.values():
        assert issubclass(cls, Transport)
    tcp_cls, port_cls = classes["tcp"], classes["virtio-serial"]
    assert issubclass(tcp_cls, Transport) and issubclass(port_cls, Transport)
    assert not tcp_cls.capabilities.identifies_vm
    assert not port_cls.capabilities.host_listens


def test_unix_connect_error_names_the_socket(tmp_path: Path) -> None:
    t = make("unix", path=str(tmp_path / "nobody.sock"))
    with pytest.raises(ChannelError, match=r"nobody\.sock"):
        run(t.connect())


# -- virtio-serial ---------------------------------------------------------------------------


def test_virtio_serial_guest_side_over_a_pty() -> None:
    """A pseudo-terminal is a character device like a virtio port (and like a plain
    serial line): the driver puts it in raw mode and frames lines over it."""
    master, slave = os.openpty()
    t = make("virtio-serial", device=os.ttyname(slave), connect_timeout=2)

    async def scenario() -> None:
        reader, writer = await t.connect()
        writer.write(b'{"type": "hello"}\n')
        await writer.drain()
        got = b""
        while not got.endswith(b"\n"):
            got += await asyncio.get_running_loop().run_in_executor(None, os.read, master, 4096)
        assert got == b'{"type": "hello"}\n'  # no echo, no CRLF: raw mode
        os.write(master, b"line one\nline two\n")
        assert await read_line(reader) == b"line one\n"
        assert await read_line(reader) == b"line two\n"
        os.close(master)  # the host end goes away
        with pytest.raises((OSError, AssertionError)):
            line = await read_line(reader)
            assert line is not None  # EOF (None) is also a clean end
        writer.close()

    try:
        run(scenario())
    finally:
        os.close(slave)


def test_virtio_serial_missing_port_is_named() -> None:
    t = VirtioSerialTransport(VirtioSerialTransport.Options(name="org.example.none"))
    with pytest.raises(ChannelError, match=r"org\.example\.none"):
        run(t.connect())


def test_virtio_serial_host_side_connects_to_the_hypervisor_socket(tmp_path: Path) -> None:
    """QEMU listens; the host connects, and connects again after each connection ends."""
    path = tmp_path / "vm1.port.sock"
    t = make("virtio-serial", path=str(path), retry_seconds=0.1)
    seen: list[str] = []

    async def scenario() -> None:
        async def qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"from the guest\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(qemu, str(path))

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
            seen.append(f"{peer}: {(await reader.readline()).decode().strip()}")

        task = asyncio.create_task(t.serve(handler))
        while len(seen) < 2:
            await asyncio.sleep(0.05)
        task.cancel()
        server.close()

    run(scenario())
    assert seen[:2] == [f"virtio-serial:org.vmreclaim.0 via {path}: from the guest"] * 2


# -- vsock ----------------------------------------------------------------------------------


def test_vsock_stream_framing_over_a_socket_pair() -> None:
    """The streams ``connect`` builds for a connected AF_VSOCK socket, built here over a
    socket pair: lines both ways, and the line limit enforced by the reader."""

    async def scenario() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        ra, wa = await vsock.open_stream(a)
        rb, wb = await vsock.open_stream(b)
        wa.write(b"one\n")
        wb.write(b"two\n")
        assert await read_line(rb) == b"one\n"
        assert await read_line(ra) == b"two\n"
        wa.write(b"x" * (MAX_LINE_BYTES + 10) + b"\nnext\n")
        with pytest.raises(ProtocolError, match="discarded"):
            await read_line(rb)
        assert await read_line(rb) == b"next\n"
        wa.close()
        assert await read_line(rb) is None
        wb.close()

    run(scenario())


def test_vsock_connect_errors_come_from_the_kernel() -> None:
    """This machine has AF_VSOCK but no host on the other end: a real error, mapped."""
    t = make("vsock", cid=2, port=9)
    try:
        socket.socket(vsock.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:
        pytest.skip("no AF_VSOCK in this kernel")
    with pytest.raises(ChannelError, match="vsock:cid=2,port=9"):
        run(t.connect())


def test_vsock_host_hands_connections_to_the_vm_by_cid() -> None:
    async def scenario() -> list[str]:
        listener = vsock._Listener(4855)
        got: list[str] = []

        async def vm42(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
            got.append(peer)

        listener.handlers[42] = vm42
        for cid in (42, 43):
            a, b = socket.socketpair()
            a.setblocking(False)
            r, w = await vsock.open_stream(a)
            await listener.dispatch(r, w, cid)
            assert w.is_closing()
            b.close()
        return got

    assert run(scenario()) == ["vsock:cid=42"]


def test_vsock_options() -> None:
    with pytest.raises(ValidationError):
        vsock.VsockOptions(cid=1)  # loopback/hypervisor CIDs are never a VM
    assert vsock.VsockOptions().cid == 2


# -- tcp ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_options_need_exactly_one_good_secret(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        tcp.TcpOptions(port=1)
    with pytest.raises(ValidationError, match="128 bits"):
        tcp.TcpOptions(port=1, secret="short")
    loose = tmp_path / "loose"
    loose.write_text(SECRET)
    loose.chmod(0o644)
    t = tcp.TcpTransport(tcp.TcpOptions(port=1, secret_file=loose))
    with pytest.raises(ChannelError, match="group or others"):
        t.secret()
    loose.chmod(stat.S_IRUSR)
    assert t.secret() == SECRET.encode()


async def serve_tcp(
    secret: str,
    port: int,
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]],
) -> asyncio.Task[None]:
    host = make("tcp", port=port, secret=secret)
    task = asyncio.create_task(host.serve(handler))
    for _ in range(100):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.02)
    return task


def test_tcp_authenticated_lines_both_ways() -> None:
    port = free_port()

    async def scenario() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
            assert peer.startswith("tcp:127.0.0.1:")
            while (line := await reader.readline()) != b"":
                writer.write(b"echo " + line)
                await writer.drain()

        server = await serve_tcp(SECRET, port, echo)
        reader, writer = await make("tcp", port=port, secret=SECRET).connect()
        for text in (b"one", b'{"type": "hello"}', b"x" * 100_000):
            writer.write(text + b"\n")
            await writer.drain()
            assert await reader.readline() == b"echo " + text + b"\n"
        writer.close()
        await writer.wait_closed()
        server.cancel()

    run(scenario())


def test_tcp_wrong_secrets_are_refused_both_ways() -> None:
    port = free_port()

    async def scenario() -> None:
        reached: list[str] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
            reached.append(peer)

        server = await serve_tcp(SECRET, port, handler)
        with pytest.raises(ChannelError, match="handshake failed"):
            await make("tcp", port=port, secret="another secret of this VM").connect()
        assert not reached  # the handler never saw the stranger
        server.cancel()

    run(scenario())


def test_tcp_guest_refuses_a_host_without_the_secret() -> None:
    port = free_port()

    async def scenario() -> None:
        async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(tcp.GREETING + os.urandom(32).hex().encode() + b"\n")
            await reader.readline()
            writer.write(os.urandom(32).hex().encode() + b"\n")  # cannot compute the MAC
            await writer.drain()
            await asyncio.sleep(1)

        server = await asyncio.start_server(impostor, "127.0.0.1", port)
        with pytest.raises(ChannelError, match="host does not know"):
            await make("tcp", port=port, secret=SECRET).connect()
        server.close()

    run(scenario())


@pytest.mark.parametrize("meddle", ["flip", "replay", "inject"])
def test_tcp_tampered_lines_close_the_connection(meddle: str) -> None:
    """A proxy between guest and host changes the traffic after the handshake: the
    host receives none of the meddled lines and the connection ends."""
    port, proxy_port = free_port(), free_port()

    async def scenario() -> list[bytes]:
        received: list[bytes] = []
        done = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
            while (line := await reader.readline()) != b"":
                received.append(line)
            done.set()

        server = await serve_tcp(SECRET, port, handler)

        async def proxy(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            sr, sw = await asyncio.open_connection("127.0.0.1", port)

            async def down() -> None:
                while data := await sr.read(65536):
                    cw.write(data)

            task = asyncio.create_task(down())
            n = 0
            while line := await cr.readline():
                n += 1
                if n <= 1:  # the handshake answer passes untouched
                    sw.write(line)
                    continue
                if n == 2:
                    sw.write(line)  # one good line
                elif meddle == "flip":
                    sw.write(line[:-2] + bytes([line[-2] ^ 1]) + b"\n")
                elif meddle == "replay":
                    sw.write(line)
                    sw.write(line)
                else:
                    sw.write(b"0" * 64 + b' {"type": "record"}\n')
            sw.close()
            task.cancel()

        pserver = await asyncio.start_server(proxy, "127.0.0.1", proxy_port)
        _, writer = await make("tcp", port=proxy_port, secret=SECRET).connect()
        for text in (b"good one", b"second", b"third"):
            writer.write(text + b"\n")
            await writer.drain()
        await asyncio.wait_for(done.wait(), 10)
        writer.close()
        server.cancel()
        pserver.close()
        return received

    received = run(scenario())
    if meddle == "replay":
        assert received == [b"good one\n", b"second\n"]  # the copy is refused
    else:
        assert received == [b"good one\n"]


# -- tcp under attack (issue 11 items 4 and 9) --------------------------------------------------


@pytest.mark.parametrize(
    "weak",
    [
        "abcdefghijklmnopqrstuv",  # 22 lower-case letters: about 103 bits
        "0123456789abcdef0123456789abcde",  # 31 hex digits: 124 bits
        "0" * 64,  # long, but one symbol
        "passwordpassword1234",  # hand-written
    ],
)
def test_tcp_secrets_under_128_bits_are_refused_at_config_time(weak: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="128 bits"):
        tcp.TcpOptions(port=1, secret=weak)
    path = tmp_path / "weak"
    path.write_text(weak + "\n")
    path.chmod(0o600)
    with pytest.raises(ChannelError, match="128 bits"):
        tcp.TcpTransport(tcp.TcpOptions(port=1, secret_file=path)).secret()


def test_tcp_secrets_of_128_bits_or_more_are_taken() -> None:
    import secrets

    for good in (secrets.token_hex(16), secrets.token_urlsafe(22), SECRET):
        assert tcp.TcpOptions(port=1, secret=good).secret is not None


def test_tcp_handshake_failures_are_rate_limited() -> None:
    """A guesser gets a few tries per minute, then the port closes on it at once."""
    port = free_port()

    async def scenario() -> tuple[int, bytes]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
            writer.close()

        server = await serve_tcp(SECRET, port, handler)
        refused = 0
        for _ in range(tcp.HANDSHAKE_FAILURES_PER_MINUTE + 2):
            with contextlib.suppress(ChannelError):
                await make("tcp", port=port, secret="wrong " + SECRET).connect()
            refused += 1
        # Locked out now: no greeting at all, not even for the right secret.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        first = await asyncio.wait_for(reader.read(100), 5)
        writer.close()
        server.cancel()
        return refused, first

    refused, first = run(scenario())
    assert refused == tcp.HANDSHAKE_FAILURES_PER_MINUTE + 2
    assert first == b""


def test_tcp_pending_handshakes_per_vm_are_bounded() -> None:
    """Idle connections that never answer the challenge hold at most a few slots; the
    others are closed at once (no descriptor, no buffer kept for them)."""
    port = free_port()

    async def scenario() -> list[bytes]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
            writer.close()

        server = await serve_tcp(SECRET, port, handler)
        conns = [
            await asyncio.open_connection("127.0.0.1", port) for _ in range(tcp.MAX_PENDING_HANDSHAKES + 6)
        ]
        firsts = [await asyncio.wait_for(r.read(len(tcp.GREETING)), 5) for r, _ in conns]
        for _, w in conns:
            w.close()
        server.cancel()
        return firsts

    firsts = run(scenario())
    assert sum(1 for f in firsts if f == tcp.GREETING) == tcp.MAX_PENDING_HANDSHAKES
    assert sum(1 for f in firsts if f == b"") == 6


def test_tcp_host_stops_reading_a_peer_whose_lines_are_not_consumed() -> None:
    """Read-side flow control after the handshake: while the host's session does not
    read (it waits for the peer to read its acks), the channel buffers a bounded
    amount and then the sender blocks; nothing grows without bound."""
    port = free_port()
    line = b'{"type": "pong", "nonce": 0, "pad": "' + b"x" * 65_000 + b'"}\n'

    async def scenario() -> int:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
            await asyncio.sleep(3600)  # never reads

        server = await serve_tcp(SECRET, port, handler)
        _, writer = await make("tcp", port=port, secret=SECRET).connect()
        sent = 0
        try:
            while sent < 256 * 1024 * 1024:
                writer.write(line)
                await asyncio.wait_for(writer.drain(), 2)
                sent += len(line)
        except TimeoutError:
            pass
        writer.transport.abort()
        server.cancel()
        return sent

    sent = run(scenario(), timeout=120)
    assert sent < 48 * 1024 * 1024, f"the host took {sent} bytes it never read"
