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
from typing import TYPE_CHECKING, Any

from vmreclaim.agent import reconcile
from vmreclaim.core import protocol as p
from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.model import MAX_RANGES_PER_RECORD
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.core.transports import MAX_LINE_BYTES

if TYPE_CHECKING:
    from vmreclaim.agent.runtime import Agent

log = logging.getLogger("vmreclaim.agent")

#: Records sent and not yet answered, at most.
WINDOW = 32
#: Unread answers buffered before the read loop waits for the host to read.
DRAIN_ABOVE = 1024 * 1024
#: How long the host has to answer ``hello``.
WELCOME_TIMEOUT = 30.0


class LineTooLong(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"host line of more than {size} bytes discarded (the limit is {MAX_LINE_BYTES})")


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """One line (with its newline), ``None`` at end of stream.

    A line longer than the reader's limit is consumed whole, up to and including its
    newline, and reported as :class:`LineTooLong`: the next call starts at a real line
    boundary instead of parsing the rest of the long line as lines of its own.
    """
    dropped = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if dropped:
                raise LineTooLong(dropped + len(exc.partial)) from None
            return exc.partial or None
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.readexactly(exc.consumed)
            dropped += len(chunk)
            continue
        if dropped:
            raise LineTooLong(dropped + len(line))
        return line


class Session:
    """The agent's side of one connection."""

    def __init__(self, agent: Agent, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            for fence in agent.keeper.finish_all("error", owner=self):
                log.warning("fence %d on %s thawed: the channel closed", fence.id, fence.disk)
            for task in self._tasks:
                task.cancel()
            self.writer.close()

    async def _next(self) -> tuple[Any, float] | None:
        """The next valid host message and when its line arrived; ``None`` at EOF.
        Invalid lines are answered with ``error`` here and skipped."""
        while True:
            try:
                line = await read_line(self.reader)
            except LineTooLong as exc:
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
            if agent.spool.remove(msg.seq):
                agent.records_changed.set()
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
        changed = self.agent.records_changed
        spool = self.agent.spool
        while not self.closed:
            changed.clear()
            for seq, (_disk, line) in list(spool.pending.items()):
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
        fss = agent.disks.get(msg.disk)
        problem = None
        if not fss:
            problem = f"disk {msg.disk!r} is not watched by this agent (it watches {agent.disk_names()})"
            self.refuse(problem, f"fence:{msg.fence}")
        elif not agent.can_fence:
            problem = "this agent cannot freeze filesystems (it needs CAP_SYS_ADMIN)"
        elif any(fs.mode != "getfsmap" for fs in fss):
            problem = (
                f"disk {msg.disk!r} holds a filesystem without GETFSMAP: its ranges cannot be re-verified"
            )
        if problem is not None:
            self.send(p.FenceRefused(fence=msg.fence, error=problem))
            return
        assert fss is not None
        lease = min(msg.lease_ms / 1000.0, agent.config.fence_max_lease_seconds)
        deadline = received + lease
        try:
            fence, ready = await agent.fence(msg, fss, deadline, int(lease * 1000), owner=self)
        except Exception as exc:
            log.warning("fence %d on %s refused: %s", msg.fence, msg.disk, exc)
            self.send(p.FenceRefused(fence=msg.fence, error=str(exc)[:1024]))
            return
        fence.announced = True  # from now on its end is reported with 'released'
        self.send(ready)

    def _release(self, msg: p.Release) -> None:
        keeper = self.agent.keeper
        fence = keeper.by_id(msg.fence)
        if fence is not None:
            keeper.finish(fence, "release")
            log.info("fence %d on %s: released by the host", fence.id, fence.disk)
            self.send(p.Released(fence=msg.fence, why="release"))
        elif msg.fence in keeper.finished:
            self.send(p.Released(fence=msg.fence, why="already-released"))
        else:
            self.refuse(
                f"release of fence {msg.fence}, which this agent never raised", f"release:{msg.fence}"
            )

    def lease_ran_out(self, fence_id: int) -> None:
        self.send(p.Released(fence=fence_id, why="lease"))

    async def _trim(self, msg: p.Trim) -> None:
        agent = self.agent
        fss = agent.disks.get(msg.disk)
        if not fss:
            error = f"disk {msg.disk!r} is not watched by this agent (it watches {agent.disk_names()})"
            self.refuse(error, f"trim:{msg.fence}")
            self.send(p.TrimDone(fence=msg.fence, trimmed_bytes=0, error=error))
            return
        trimmed, failed = await agent.trim(fss, p.pairs_to_ranges(msg.ranges))
        self.send(p.TrimDone(fence=msg.fence, trimmed_bytes=trimmed, error=failed))

    async def _reconcile(self, msg: p.Reconcile) -> None:
        # A worker thread: GETFSMAP of a whole fragmented filesystem takes seconds.
        agent = self.agent
        answer = await asyncio.to_thread(reconcile.answer, msg, agent.disks.get(msg.disk), agent.pipeline)
        for message in answer:
            self.send(message)
            await self.writer.drain()


def fence_ready(fence_id: int, disk: str, ranges: RangeSet, disk_size: int, lease_ms: int) -> p.FenceReady:
    """The answer to a fence: at most the protocol's number of ranges (a subset is safe:
    the host only punches what is listed)."""
    ranges = ranges.clip(ByteRange(0, disk_size)) if disk_size else ranges
    first = next(ranges.chunks(MAX_RANGES_PER_RECORD), RangeSet())
    return p.FenceReady(fence=fence_id, disk=disk, ranges=p.ranges_to_pairs(first), lease_ms=lease_ms)


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
