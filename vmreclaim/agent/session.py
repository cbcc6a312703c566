"""One connection to the host: hello/welcome, records out, fences and trims in.

The rules are docs/protocol.md's. Every line from the host is validated with
:func:`vmreclaim.core.protocol.decode_from_host` before anything is done; a line that
fails is answered with ``error`` and dropped, so nothing the host sends can freeze a
filesystem it did not name correctly or stop the agent. When the connection ends, for
whatever reason, the fences it raised are thawed at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from vmreclaim.core import protocol as p
from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.lines import read_line
from vmreclaim.core.ranges import RangeSet

log = logging.getLogger("vmreclaim.agent")

#: Records sent and not yet answered, at most.
WINDOW = 32
#: Unread answers buffered before the read loop waits for the host to read.
DRAIN_ABOVE = 1024 * 1024
#: How long the host has to answer ``hello``.
WELCOME_TIMEOUT = 30.0


class AgentLink(Protocol):
    """Everything a session may ask of the agent (:class:`vmreclaim.agent.runtime.Agent`).

    The session asks; it never reads the agent's fields, so the agent's insides (its
    spool, its fence keeper, its filesystems) can change without the session knowing.
    """

    @property
    def records_changed(self) -> asyncio.Event:
        """Set when a record is spooled or answered: the sender looks again."""
        ...

    def hello(self) -> p.Hello:
        """The ``hello`` this agent opens every connection with."""
        ...

    def welcomed(self, welcome: p.Welcome) -> None:
        """The host answered ``hello``: learn the VM's name, check the disks."""
        ...

    def pending_records(self) -> list[tuple[int, bytes]]:
        """Spooled record lines not yet acknowledged, oldest first, with their ``seq``."""
        ...

    def record_answered(self, seq: int) -> None:
        """The host acknowledged (or refused for good) record ``seq``: forget it."""
        ...

    def watches(self, disk: str) -> bool:
        """Whether ``disk`` holds a filesystem this agent watches."""
        ...

    def disk_names(self) -> str:
        """The watched disks, for messages."""
        ...

    def fence_problem(self, disk: str) -> str | None:
        """Why a watched ``disk`` cannot be fenced now, or ``None`` if it can."""
        ...

    async def fence(
        self, msg: p.Fence, received: float, *, owner: object, on_lease_expired: Callable[[int], None]
    ) -> p.FenceReady:
        """Freeze the disk, re-verify its ranges under the freeze, and return the answer.

        ``on_lease_expired(fence_id)`` is called if the lease runs out before the host
        releases it; the fences of ``owner`` end when :meth:`drop_fences` is called.
        Raises (with a message to send back) if the fence cannot be raised.
        """
        ...

    def release_fence(self, fence_id: int) -> str | None:
        """End fence ``fence_id`` for the host: ``release`` if this call ended it,
        ``already-released`` if it had ended, ``None`` if the agent never raised it."""
        ...

    def drop_fences(self, owner: object) -> None:
        """The channel of ``owner`` closed: thaw its fences at once."""
        ...

    async def trim(self, disk: str, ranges: RangeSet) -> tuple[int, str | None]:
        """FITRIM ``ranges`` (bytes of ``disk``): bytes the kernel reports, and errors."""
        ...

    async def free_space(self, request: p.Reconcile) -> list[p.FreeSpace]:
        """The ``free_space`` answer to a ``reconcile`` (never raises: errors are answered)."""
        ...


class Session:
    """The agent's side of one connection."""

    def __init__(self, agent: AgentLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.agent = agent
        self.reader = reader
        self.writer = writer
        self.in_flight: set[int] = set()
        self.welcomed = False
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- output ------------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        if self.closed:
            return
        try:
            self.writer.write(p.encode(message))
        except (OSError, RuntimeError) as exc:
            log.info("channel: write failed (%s)", exc)
            self.closed = True

    def refuse(self, error: str, ref: str | None) -> None:
        log.warning("host message refused: %s", error)
        self.send(p.Error(error=error[:4096], ref=ref[:256] if ref else None))

    # -- the connection ------------------------------------------------------------------------

    async def run(self) -> None:
        """Until the channel closes; returns normally on EOF or a channel error."""
        agent = self.agent
        self.send(agent.hello())
        try:
            await self.writer.drain()
            welcome = await asyncio.wait_for(self._await_welcome(), WELCOME_TIMEOUT)
            if welcome is None:
                return
            if not p.MIN_PROTOCOL_VERSION <= welcome.v <= p.PROTOCOL_VERSION:
                log.error(
                    "host speaks protocol version %d, this agent %d to %d: disconnecting",
                    welcome.v,
                    p.MIN_PROTOCOL_VERSION,
                    p.PROTOCOL_VERSION,
                )
                return
            self.welcomed = True
            agent.welcomed(welcome)
            sender = asyncio.create_task(self._sender())
            try:
                await self._read_loop()
            finally:
                sender.cancel()
        except TimeoutError:
            log.error("host did not answer hello within %.0fs", WELCOME_TIMEOUT)
        except (OSError, ConnectionError) as exc:
            log.info("channel: %s", exc)
        finally:
            self.closed = True
            agent.drop_fences(self)
            for task in self._tasks:
                task.cancel()
            self.writer.close()

    async def _next(self) -> tuple[Any, float] | None:
        """The next valid host message and when its line arrived; ``None`` at EOF.
        Invalid lines are answered with ``error`` here and skipped."""
        while True:
            try:
                line = await read_line(self.reader, sender="host")
            except ProtocolError as exc:
                self.refuse(str(exc), None)
                continue
            received = time.monotonic()
            if line is None:
                return None
            if not line.strip():
                continue
            try:
                return p.decode_from_host(line), received
            except ProtocolError as exc:
                self.refuse(str(exc), _ref_of(line))

    async def _await_welcome(self) -> p.Welcome | None:
        while True:
            item = await self._next()
            if item is None:
                return None
            msg, _ = item
            if isinstance(msg, p.Welcome):
                return msg
            self.refuse(f"host sent {msg.type!r} before 'welcome'", _ref(msg))
            if isinstance(msg, p.Fence):
                self.send(p.FenceRefused(fence=msg.fence, error="fence before welcome"))
            elif isinstance(msg, p.Trim):
                self.send(p.TrimDone(fence=msg.fence, trimmed_bytes=0, error="trim before welcome"))

    async def _read_loop(self) -> None:
        while not self.closed:
            item = await self._next()
            if item is None:
                return
            msg, received = item
            self._dispatch(msg, received)
            # Answers are small; wait for the host to read only when it lags far behind,
            # so a host that writes without reading cannot stall this loop forever.
            if self.writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                await self.writer.drain()

    def _dispatch(self, msg: Any, received: float) -> None:
        agent = self.agent
        if isinstance(msg, p.Ack | p.Nack):
            self.in_flight.discard(msg.seq)
            if isinstance(msg, p.Nack):
                log.warning("host refused record %d: %s", msg.seq, msg.error)
            agent.record_answered(msg.seq)
        elif isinstance(msg, p.Fence):
            self._spawn(self._fence(msg, received))
        elif isinstance(msg, p.Release):
            self._release(msg)
        elif isinstance(msg, p.Trim):
            self._spawn(self._trim(msg))
        elif isinstance(msg, p.Reconcile):
            self._spawn(self._reconcile(msg))
        elif isinstance(msg, p.Ping):
            self.send(p.Pong(nonce=msg.nonce))
        elif isinstance(msg, p.Error):
            log.warning("host refused our %s: %s", msg.ref or "message", msg.error)
        elif isinstance(msg, p.Welcome):
            self.refuse("a second 'welcome' on this connection", "welcome")

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("host request failed: %r", task.exception())

    # -- records -----------------------------------------------------------------------------

    async def _sender(self) -> None:
        """Send spooled records, oldest first, with at most WINDOW unanswered."""
        agent = self.agent
        changed = agent.records_changed
        while not self.closed:
            changed.clear()
            for seq, line in agent.pending_records():
                if len(self.in_flight) >= WINDOW:
                    break
                if seq in self.in_flight:
                    continue
                self.in_flight.add(seq)
                self.writer.write(line)
            await self.writer.drain()
            await changed.wait()

    # -- fences ------------------------------------------------------------------------------

    async def _fence(self, msg: p.Fence, received: float) -> None:
        agent = self.agent
        problem: str | None
        if not agent.watches(msg.disk):
            problem = f"disk {msg.disk!r} is not watched by this agent (it watches {agent.disk_names()})"
            self.refuse(problem, f"fence:{msg.fence}")
        else:
            problem = agent.fence_problem(msg.disk)
        if problem is not None:
            self.send(p.FenceRefused(fence=msg.fence, error=problem))
            return
        try:
            ready = await agent.fence(msg, received, owner=self, on_lease_expired=self.lease_ran_out)
        except Exception as exc:
            log.warning("fence %d on %s refused: %s", msg.fence, msg.disk, exc)
            self.send(p.FenceRefused(fence=msg.fence, error=str(exc)[:1024]))
            return
        self.send(ready)

    def _release(self, msg: p.Release) -> None:
        why = self.agent.release_fence(msg.fence)
        if why is not None:
            self.send(p.Released(fence=msg.fence, why=why))
        else:
            self.refuse(
                f"release of fence {msg.fence}, which this agent never raised", f"release:{msg.fence}"
            )

    def lease_ran_out(self, fence_id: int) -> None:
        self.send(p.Released(fence=fence_id, why="lease"))

    async def _trim(self, msg: p.Trim) -> None:
        agent = self.agent
        if not agent.watches(msg.disk):
            error = f"disk {msg.disk!r} is not watched by this agent (it watches {agent.disk_names()})"
            self.refuse(error, f"trim:{msg.fence}")
            self.send(p.TrimDone(fence=msg.fence, trimmed_bytes=0, error=error))
            return
        trimmed, failed = await agent.trim(msg.disk, p.pairs_to_ranges(msg.ranges))
        self.send(p.TrimDone(fence=msg.fence, trimmed_bytes=trimmed, error=failed))

    async def _reconcile(self, msg: p.Reconcile) -> None:
        for message in await self.agent.free_space(msg):
            self.send(message)
            await self.writer.drain()


def _ref(msg: Any) -> str:
    fence = getattr(msg, "fence", None)
    return f"{msg.type}:{fence}" if fence is not None else str(msg.type)


def _ref_of(line: bytes) -> str | None:
    """The ``type`` of a refused line, when it can be read."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("type"), str):
        kind = doc["type"][:64]
        fence = doc.get("fence")
        return f"{kind}:{fence}" if type(fence) is int else kind
    return None
