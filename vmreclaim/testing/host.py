"""A running host daemon, and a scripted agent peer to talk to it, for tests.

* :func:`host_config` writes a ``vmreclaim host`` YAML file for the ``static`` hypervisor;
* :class:`HostProcess` runs ``vmreclaim host --config`` as a real process and asks it
  for its status over its real status socket;
* :class:`AgentPeer` speaks docs/protocol.md over a VM's real channel as an agent would,
  with answers to ``fence`` and ``trim`` that a test chooses. It is a test double of
  the agent (``vmreclaim agent``), honest about what it is: it verifies nothing itself,
  so it says whatever the test tells it to, which is how tests prove the host refuses
  what an agent must not be trusted with;
* the ``host_daemon`` fixture starts daemons and always stops them.

A plugin author's hypervisor or policy driver test is then a config, a daemon, a peer
and an assertion on ``status()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmreclaim.core.freespace import FreeSpace, Reconcile
from vmreclaim.core.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    Fence,
    FenceReady,
    FenceRefused,
    Hello,
    HelloDisk,
    Nack,
    Ping,
    Pong,
    RecordMessage,
    Release,
    Released,
    Trim,
    TrimDone,
    Welcome,
    decode_from_host,
    encode,
)
from vmreclaim.core.transports import MAX_LINE_BYTES

Pairs = Sequence[tuple[int, int]] | Sequence[list[int]]


# -- configuration ------------------------------------------------------------------------------


def static_vm(
    name: str,
    channel: str | os.PathLike[str],
    disks: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """One VM of the ``static`` hypervisor, listening on the unix socket ``channel``.

    ``disks`` are ``{"id", "path", "format", "discard"}`` mappings, as in the YAML.
    """
    return {
        "name": name,
        "disks": [{k: str(v) if isinstance(v, Path) else v for k, v in d.items()} for d in disks],
        "channel": {"driver": "unix", "path": str(channel)},
    }


def host_config(
    path: str | os.PathLike[str],
    vms: Sequence[dict[str, Any]],
    *,
    database: str | os.PathLike[str],
    status_socket: str | os.PathLike[str],
    policy: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write a host configuration for the ``static`` hypervisor and return its path."""
    doc: dict[str, Any] = {
        "hypervisor": {"driver": "static", "vms": list(vms)},
        "policy": policy or {"driver": "always"},
        "database": str(database),
        "status_socket": str(status_socket),
    }
    doc.update(extra)
    path = Path(path)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# -- the daemon as a process --------------------------------------------------------------------


class HostProcess:
    """``vmreclaim host --config CONFIG`` in a subprocess, logs in ``log_path``."""

    def __init__(
        self, config: str | os.PathLike[str], *, log_path: str | os.PathLike[str] | None = None
    ) -> None:
        self.config = Path(config)
        doc = yaml.safe_load(self.config.read_text())
        self.status_socket = Path(doc["status_socket"])
        self.database = Path(doc["database"])
        self.log_path = Path(log_path) if log_path else self.config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> HostProcess:
        """Start the daemon and wait until its status socket answers."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmreclaim", "--debug", "host", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vmreclaim host exited {self.proc.returncode}:\n{self.logs()}")
            try:
                self.status()
                return self
            except Exception:
                time.sleep(0.05)
        raise AssertionError(
            f"vmreclaim host did not answer on {self.status_socket} in {timeout}s:\n{self.logs()}"
        )

    def status(self) -> dict[str, Any]:
        from vmreclaim.host.status import query_status

        return query_status(self.status_socket, timeout=10)

    def disk_status(self, vm: str, disk: str = "disk0") -> dict[str, Any]:
        doc = self.status()
        for v in doc["vms"]:
            if v["name"] == vm:
                for d in v["disks"]:
                    if d["id"] == disk:
                        return dict(d)
        raise AssertionError(f"status has no disk {vm}/{disk}: {doc}")

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0, what: str = "condition"
    ) -> dict[str, Any]:
        """Poll the status document until ``predicate`` holds; return that document."""
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = self.status()
            if predicate(doc):
                return doc
            time.sleep(0.05)
        raise AssertionError(
            f"{what} not reached within {timeout}s; last status: {doc}\n{self.logs()[-4000:]}"
        )

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> HostProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def host_daemon(tmp_path: Path) -> Iterator[Callable[..., HostProcess]]:
    """Factory: ``host_daemon(vms, policy=..., **config)`` starts a daemon for the
    ``static`` VMs given (see :func:`static_vm`) with its database and status socket in
    ``tmp_path``; every daemon started is stopped at the end of the test."""
    started: list[HostProcess] = []

    def start(vms: Sequence[dict[str, Any]], *, name: str = "host", **config: Any) -> HostProcess:
        config.setdefault("database", tmp_path / f"{name}.sqlite")
        config.setdefault("status_socket", tmp_path / f"{name}.status.sock")
        path = host_config(tmp_path / f"{name}.yaml", vms, **config)
        proc = HostProcess(path)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


# -- a scripted agent ----------------------------------------------------------------------------

#: ``on_fence(fence) -> (ranges, lease_ms)`` to grant, or a string to refuse with.
FenceAnswer = tuple[Pairs, int] | str
FenceHandler = Callable[[Fence], Awaitable[FenceAnswer] | FenceAnswer]
TrimHandler = Callable[[Trim], Awaitable[int] | int]


async def _maybe(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


def grant_all(fence: Fence) -> FenceAnswer:
    """The default fence answer: every asked range is still free, the asked lease."""
    return [(s, n) for s, n in fence.ranges], fence.lease_ms


@dataclass
class AgentPeer:
    """A scripted agent on a VM's unix channel (see the module docstring)."""

    path: Path
    disks: Sequence[HelloDisk] = (HelloDisk(id="disk0"),)
    capabilities: Sequence[str] = ("records", "fence")
    on_fence: FenceHandler = grant_all
    on_trim: TrimHandler | None = None
    #: Answer ``release`` with ``released`` (a real agent always does).
    answer_release: bool = True
    version: int = PROTOCOL_VERSION
    welcome: Welcome | None = None
    acked: set[int] = field(default_factory=set)
    nacked: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    fences: list[Fence] = field(default_factory=list)
    ready: dict[int, tuple[float, FenceReady]] = field(default_factory=dict)
    releases: list[tuple[float, Release]] = field(default_factory=list)
    trims: list[Trim] = field(default_factory=list)
    #: ``reconcile`` requests received (protocol version 2). ``on_reconcile``, when set,
    #: gives the ``free_space`` messages to answer each with; unset, nothing is answered.
    reconciles: list[Reconcile] = field(default_factory=list)
    on_reconcile: Callable[[Reconcile], Sequence[FreeSpace]] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _task: asyncio.Task[None] | None = None
    _answered: asyncio.Condition = field(default_factory=asyncio.Condition)
    _seq: int = 0

    async def connect(self, timeout: float = 20.0, *, hello: bool = True) -> Welcome | None:
        """Connect (retrying until the socket is there), say hello, wait for welcome."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self.path), limit=MAX_LINE_BYTES
                )
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        if not hello:
            self._task = asyncio.get_running_loop().create_task(self._read())
            return None
        await self.send(
            Hello(
                v=self.version,
                agent="vmreclaim.testing AgentPeer",
                capabilities=list(self.capabilities),
                disks=list(self.disks),
            )
        )
        line = await asyncio.wait_for(self._reader.readuntil(b"\n"), timeout)
        message = decode_from_host(line)
        if isinstance(message, Error):
            self.errors.append(message.error)
            return None
        assert isinstance(message, Welcome), f"expected welcome, got {message}"
        self.welcome = message
        self._task = asyncio.get_running_loop().create_task(self._read())
        return message

    async def send(self, message: Any) -> None:
        await self.send_raw(encode(message))

    async def send_raw(self, data: bytes) -> None:
        assert self._writer is not None, "not connected"
        self._writer.write(data)
        await self._writer.drain()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def send_record(
        self, ranges: Pairs, *, disk: str = "disk0", seq: int | None = None, **fields: Any
    ) -> int:
        """Send one deletion record; returns its ``seq``."""
        seq = self.next_seq() if seq is None else seq
        pairs = [[int(s), int(n)] for s, n in ranges]
        doc: dict[str, Any] = {
            "v": 1,
            "vm": "",
            "disk": disk,
            "ranges": pairs,
            "bytes": sum(n for _, n in pairs),
            "fs": "ext4",
            "seq": seq,
        }
        doc.update(fields)
        await self.send(RecordMessage(record=doc))
        return seq

    async def wait_answered(self, seqs: Sequence[int] | int, timeout: float = 20.0) -> None:
        """Wait until every ``seq`` got its ``ack`` or ``nack``."""
        wanted = {seqs} if isinstance(seqs, int) else set(seqs)

        def done() -> bool:
            return wanted <= (self.acked | set(self.nacked)) or self.closed.is_set()

        async with self._answered:
            await asyncio.wait_for(self._answered.wait_for(done), timeout)
        missing = wanted - self.acked - set(self.nacked)
        assert not missing, f"records {sorted(missing)} unanswered; channel closed"

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with self._answered:
            await asyncio.wait_for(self._answered.wait_for(predicate), timeout)

    async def _notify(self) -> None:
        async with self._answered:
            self._answered.notify_all()

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                try:
                    line = await self._reader.readuntil(b"\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                message = decode_from_host(line)
                if isinstance(message, Ack):
                    self.acked.add(message.seq)
                elif isinstance(message, Nack):
                    self.nacked[message.seq] = message.error
                elif isinstance(message, Error):
                    self.errors.append(message.error)
                elif isinstance(message, Fence):
                    self.fences.append(message)
                    asyncio.get_running_loop().create_task(self._fence(message))
                elif isinstance(message, Release):
                    self.releases.append((time.monotonic(), message))
                    if self.answer_release:
                        await self.send(Released(fence=message.fence, why="release"))
                elif isinstance(message, Trim):
                    self.trims.append(message)
                    asyncio.get_running_loop().create_task(self._trim(message))
                elif isinstance(message, Reconcile):
                    self.reconciles.append(message)
                    if self.on_reconcile is not None:
                        for answer in self.on_reconcile(message):
                            await self.send(answer)
                elif isinstance(message, Ping):
                    await self.send(Pong(nonce=message.nonce))
                await self._notify()
        finally:
            self.closed.set()
            await self._notify()

    async def _fence(self, fence: Fence) -> None:
        answer = await _maybe(self.on_fence(fence))
        if isinstance(answer, str):
            await self.send(FenceRefused(fence=fence.fence, error=answer))
            return
        ranges, lease_ms = answer
        ready = FenceReady(
            fence=fence.fence,
            disk=fence.disk,
            ranges=[(int(s), int(n)) for s, n in ranges],
            lease_ms=lease_ms,
        )
        self.ready[fence.fence] = (time.monotonic(), ready)
        with contextlib.suppress(ConnectionError, AssertionError):
            await self.send(ready)
        await self._notify()

    async def _trim(self, trim: Trim) -> None:
        trimmed = (
            await _maybe(self.on_trim(trim)) if self.on_trim is not None else sum(n for _, n in trim.ranges)
        )
        with contextlib.suppress(ConnectionError, AssertionError):
            await self.send(TrimDone(fence=trim.fence, trimmed_bytes=trimmed))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def __aenter__(self) -> AgentPeer:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
