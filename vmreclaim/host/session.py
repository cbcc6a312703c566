"""One agent connection: docs/protocol.md as the host speaks it.

A session belongs to the VM whose channel the connection arrived on, and to nothing
else: the VM in ``welcome``, the key every record is stored under and the disks a
record may name all come from the hypervisor's description of that VM, never from what
the agent sends (DESIGN.md section 4, rule 5). Every line is validated
(:mod:`vmreclaim.core.protocol`, :meth:`DeletionRecord.from_json`) before anything is
done with it; a bad line is answered (``nack`` for a record, ``error`` otherwise),
logged and counted, and the session goes on — unless the line is too long to find the
next one, or the agent keeps sending garbage, in which case the channel is dropped.
Other VMs never notice.

The session is also the host's end of a fence: :meth:`AgentSession.fence` sends the
request and waits for the answer, :meth:`AgentSession.release` ends it, and a lease the
daemon is punching under is revoked the moment the channel drops or the agent says it
has thawed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmreclaim.core.errors import FenceError, ProtocolError
from vmreclaim.core.freespace import FreeSpace, Reconcile
from vmreclaim.core.hypervisors import VMInfo
from vmreclaim.core.lease import Lease
from vmreclaim.core.lines import read_line
from vmreclaim.core.model import MAX_RANGES_PER_RECORD, DeletionRecord, Disk
from vmreclaim.core.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    RECONCILE_VERSION,
    Ack,
    Error,
    Fence,
    FenceReady,
    FenceRefused,
    Hello,
    Nack,
    Pong,
    RecordMessage,
    Release,
    Released,
    Trim,
    TrimDone,
    Welcome,
    WelcomeDisk,
    _Message,
    check_record_document,
    decode_from_agent,
    encode,
    ranges_to_pairs,
    record_seq,
)
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.transports import MAX_LINE_BYTES
from vmreclaim.host.budget import DEFAULT_LIMITS, VMBudget
from vmreclaim.host.logs import event, guest_event
from vmreclaim.host.reconcile import FreeSpaceAnswer, FreeSpaceCollector

#: After this long without a hello the host says (once) that it is still waiting.
HELLO_TIMEOUT = 30.0
#: A session that sends this many bad lines in a row is dropped.
MAX_BAD_LINES = 32
#: How long the host waits for ``released`` after asking for it (the agent thaws anyway).
RELEASE_WAIT = 2.0

_fence_ids = itertools.count(1)


def next_fence_id() -> int:
    """Fence ids are unique in the daemon's life, so a late answer can't be mistaken."""
    return next(_fence_ids)


@dataclass
class _Pending:
    """A request waiting for the agent's answer."""

    kind: str
    future: asyncio.Future[Any]
    sent_at: float


@dataclass
class SessionInfo:
    """What the agent said about itself in ``hello``."""

    agent: str = ""
    capabilities: frozenset[str] = frozenset()
    #: Disk id → ``"fence"`` or ``"trim"``, as the ``welcome`` told the agent.
    modes: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    #: Disk id → why the agent's disk of that name is not this VM's disk (sizes differ).
    mismatched: dict[str, str] = field(default_factory=dict)


class SessionHost(Protocol):
    """What a session may ask of the daemon: all of it, and nothing else.

    The daemon's :class:`~vmreclaim.host.intake.Intake` implements it; a test may hand
    in anything that does.
    """

    async def disk_sizes(self, vm: VMInfo) -> dict[str, int]:
        """Virtual sizes of ``vm``'s disks, by disk id (records are bounded by them)."""
        ...

    def attach(self, session: AgentSession) -> None:
        """``session`` is now the VM's agent (after ``welcome``)."""
        ...

    def detach(self, session: AgentSession) -> None:
        """``session`` has closed."""
        ...

    def rejected(self, vm: str, reason: str, kind: str) -> None:
        """A message from ``vm``'s channel was refused (count it, log it, tell observers)."""
        ...

    def admit(self, disk: Disk, record: DeletionRecord) -> str | None:
        """Why a valid record cannot be taken now (a full backlog), or ``None``."""
        ...

    def ingest(
        self, disk: Disk, record: DeletionRecord, done: Callable[[int | None, BaseException | None], None]
    ) -> None:
        """Store ``record`` durably; ``done`` is called once it is (or is not)."""
        ...

    async def room(self) -> None:
        """Return once the commit backlog has room for more records."""
        ...


class AgentSession:
    """The host's side of one agent connection."""

    def __init__(
        self,
        host: SessionHost,
        vm: VMInfo,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        budget: VMBudget | None = None,
    ) -> None:
        self.host = host
        #: What this VM's channel may still cost (shared by its connections).
        self.budget = budget or VMBudget(DEFAULT_LIMITS)
        self.vm = vm
        self.name = vm.identity.name
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.info = SessionInfo()
        self.connected_at = time.time()
        self.welcomed = False
        self.closed = False
        self.records = 0
        self.rejected = 0
        self._bad_in_a_row = 0
        self._waiting: dict[int, _Pending] = {}
        self._abandoned: set[int] = set()
        self._leases: dict[int, Lease] = {}
        #: One fence (or trim) per VM at a time: a guest freezes one disk at once.
        self.fence_lock = asyncio.Lock()
        #: The protocol version of this connection (set by the handshake).
        self.version = 0
        self._free_space = FreeSpaceCollector()

    # -- the connection's life -----------------------------------------------------------

    async def run(self) -> None:
        guest_event(self.name, logging.INFO, "agent.connected", peer=self.peer)
        try:
            if await self._handshake():
                await self._serve()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            guest_event(
                self.name, logging.INFO, "agent.connection_lost", error=str(exc) or type(exc).__name__
            )
        finally:
            await self.close("channel closed")

    async def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        for lease in self._leases.values():
            lease.revoke(f"{why} ({self.peer})")
        for pending in self._waiting.values():
            if not pending.future.done():
                pending.future.set_exception(FenceError(f"agent of VM {self.name}: {why}"))
                pending.future.exception()  # seen here; a waiter, if any, still gets it
        self._free_space.close(f"agent of VM {self.name}: {why}")
        self.host.detach(self)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        guest_event(
            self.name,
            logging.INFO,
            "agent.disconnected",
            why=why,
            records=self.records,
            rejected=self.rejected,
        )

    def send(self, message: _Message | Reconcile) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(encode(message))

    async def _next_line(self) -> bytes | None:
        """The next line, or ``None`` at the end of the stream; an over-long line is
        discarded and reported as a :class:`ProtocolError` (the caller answers ``error``
        and goes on with the next line, docs/protocol.md "Framing")."""

        def partial(size: int) -> None:
            guest_event(self.name, logging.WARNING, "agent.partial_line", bytes=size)

        return await read_line(self.reader, sender=f"agent of VM {self.name}", on_partial=partial)

    async def _handshake(self) -> bool:
        # A silent channel is a guest still booting (QEMU's end of a virtio-serial port
        # is there from the VM's start), not hostile input: wait for it without counting
        # a rejection, and say once that it is slow. A guest can only hold its own channel.
        slow = asyncio.get_running_loop().call_later(
            HELLO_TIMEOUT,
            lambda: event(logging.INFO, "agent.waiting_for_hello", vm=self.name, seconds=HELLO_TIMEOUT),
        )
        try:
            line = await self._next_line()
        except ProtocolError as exc:
            self._refuse(str(exc))
            return False
        finally:
            slow.cancel()
        if line is None:
            return False
        await self.budget.pace(len(line))
        try:
            hello = decode_from_agent(line)
        except ProtocolError as exc:
            self._refuse(str(exc))
            return False
        if not isinstance(hello, Hello):
            self._refuse(f"the first message must be 'hello', not {hello.type!r}")
            return False
        if hello.v < MIN_PROTOCOL_VERSION:
            self._refuse(
                f"protocol version {hello.v} is not supported; this host speaks versions "
                f"{MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
            )
            return False
        caps = frozenset(hello.capabilities)
        announced = {d.id: d for d in hello.disks}
        sizes = await self.host.disk_sizes(self.vm)
        modes = {}
        mismatched = {}
        for disk in self.vm.disks:
            said = announced.get(disk.id)
            trim = disk.passes_discards and "trim" in caps and said is not None and said.discard
            modes[disk.id] = "trim" if trim else "fence"
            if said is not None and said.size and disk.id in sizes and said.size != sizes[disk.id]:
                # The guest's disk of that name is not the disk behind this image: its
                # offsets would land on someone else's data. Nothing of it is taken.
                mismatched[disk.id] = (
                    f"the agent's disk {disk.id!r} has {said.size} bytes but the image {disk.path} "
                    f"of {disk.key} has a virtual size of {sizes[disk.id]} bytes"
                )
                guest_event(
                    self.name,
                    logging.ERROR,
                    "agent.disk_mismatch",
                    disk=disk.id,
                    detail=mismatched[disk.id],
                )
        self.info = SessionInfo(hello.agent, caps, modes, sizes, mismatched)
        self.version = min(hello.v, PROTOCOL_VERSION)
        self.send(
            Welcome(
                v=self.version,
                vm=self.name,
                disks=[
                    WelcomeDisk(id=d.id, size=sizes.get(d.id, 0), mode=modes[d.id]) for d in self.vm.disks
                ],
            )
        )
        self.welcomed = True
        unknown = sorted(set(announced) - {d.id for d in self.vm.disks})
        guest_event(
            self.name,
            logging.INFO,
            "agent.hello",
            agent=hello.agent,
            capabilities=sorted(caps),
            modes=modes,
            unknown_disks=unknown,
        )
        self.host.attach(self)
        return True

    def _refuse(self, reason: str) -> None:
        """A connection that never became a session: say why, count it, drop it."""
        self.send(Error(error=reason[:4096]))
        self.host.rejected(self.name, reason, "handshake")

    async def _serve(self) -> None:
        while not self.closed:
            await self.host.room()
            if not self._waiting:  # an answer the host is waiting for is never held back
                await self.budget.room()
            try:
                line = await self._next_line()
            except ProtocolError as exc:
                await self.budget.pace(MAX_LINE_BYTES)
                self._bad_line(str(exc), "oversize")
                continue
            if line is None:
                return
            # Past its rates the VM waits here, unread: its own socket fills, nobody else's.
            # Not while the host waits for this agent's answer to a fence or trim: a
            # lease counts from the request, and the VM's own agent is what it waits for.
            if not self._waiting:
                await self.budget.pace(len(line))
            started = time.perf_counter()
            try:
                message = decode_from_agent(line)
            except ProtocolError as exc:
                self._bad_line(str(exc), "malformed")
            else:
                self._dispatch(message)
            # The event loop's time this line took is the VM's to pay (its CPU share).
            self.budget.charge(time.perf_counter() - started)
            if self._bad_in_a_row >= MAX_BAD_LINES:
                await self.close(f"{MAX_BAD_LINES} bad lines in a row")
                return
            if self.writer.transport.get_write_buffer_size() > 1 << 20:
                await self.writer.drain()

    def _bad_line(self, reason: str, kind: str, *, seq: int | None = None) -> None:
        self._bad_in_a_row += 1
        self.rejected += 1
        self.host.rejected(self.name, reason, kind)
        self.send(Nack(seq=seq, error=reason[:1024]) if seq is not None else Error(error=reason[:4096]))

    # -- messages from the agent ---------------------------------------------------------

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, RecordMessage):
            self._record(message.record)
        elif isinstance(message, FenceReady | FenceRefused | TrimDone):
            self._answer(message.fence, message)
        elif isinstance(message, Released):
            self._released(message)
        elif isinstance(message, Error):
            guest_event(self.name, logging.WARNING, "agent.error", error=message.error, ref=message.ref)
        elif isinstance(message, FreeSpace):
            refusal = self._free_space.received(message)
            if refusal is not None:
                self._bad_line(refusal, "free_space")
        elif isinstance(message, Pong):
            pass
        elif isinstance(message, Hello):
            self._bad_line("'hello' may only be the first message", "protocol")

    def _record(self, doc: dict[str, Any]) -> None:
        seq = record_seq(doc)
        try:
            check_record_document(doc)
        except ProtocolError as exc:
            # A seq that cannot be echoed gets a bare ``error`` (nack needs a wire int).
            self._bad_line(f"record {seq}: {exc}", "invalid", seq=seq)
            return
        assert seq is not None  # check_record_document bounded it
        disk_id = doc.get("disk")
        disk = self.vm.disk(disk_id) if isinstance(disk_id, str) else None
        if disk is None:
            have = ", ".join(d.id for d in self.vm.disks) or "none"
            self._bad_line(
                f"record {seq}: VM {self.name} has no disk {disk_id!r} (its disks: {have})",
                "unknown_disk",
                seq=seq,
            )
            return
        if disk.id in self.info.mismatched:
            self._bad_line(f"record {seq}: {self.info.mismatched[disk.id]}", "disk_mismatch", seq=seq)
            return
        size = self.info.sizes.get(disk.id)
        if size is None:
            self._bad_line(
                f"record {seq}: the size of disk {disk.key} is not known: its image {disk.path} "
                "cannot be read",
                "unknown_size",
                seq=seq,
            )
            return
        try:
            record = DeletionRecord.from_json(doc, vm=self.name, disk_size=size)
        except ProtocolError as exc:
            self._bad_line(f"record {seq} for {disk.key}: {exc}", "invalid", seq=seq)
            return
        refusal = self.host.admit(disk, record)
        if refusal is not None:
            self._bad_line(f"record {seq} for {disk.key}: {refusal}", "backlog", seq=seq)
            return
        self._bad_in_a_row = 0
        self.records += 1
        self.budget.hold(len(record.ranges))
        self.host.ingest(disk, record, self._acknowledger(record))

    def _acknowledger(self, record: DeletionRecord) -> Callable[[int | None, BaseException | None], None]:
        def done(rid: int | None, error: BaseException | None) -> None:
            self.budget.release(len(record.ranges))
            if error is None:
                self.send(Ack(seq=record.seq))
            elif isinstance(error, ProtocolError):
                # This record alone was refused by the database: it would never pass.
                self._bad_line(f"record {record.seq}: {error}", "unstorable", seq=record.seq)
            elif not self.closed:
                # Not durable, so not acknowledged: the agent still has it in its spool
                # and sends it again when it reconnects.
                self.send(Error(error=f"record {record.seq} could not be stored: {error}"[:4096]))
                asyncio.get_running_loop().create_task(self.close("database error"))

        return done

    def _answer(self, fid: int, message: FenceReady | FenceRefused | TrimDone) -> None:
        pending = self._waiting.get(fid)
        if pending is not None and not pending.future.done():
            self._bad_in_a_row = 0
            pending.future.set_result(message)
            return
        if isinstance(message, FenceReady):
            # An answer after the host gave up, or to a fence it never asked for: the
            # agent froze a filesystem for nothing. Let it go at once; punch nothing.
            event(logging.WARNING, "fence.late_ready", vm=self.name, fence=fid, asked=fid in self._abandoned)
            self.send(Release(fence=fid))
            return
        if fid not in self._abandoned:
            self._bad_line(f"answer to fence {fid}, which this host never sent", "protocol")

    def _released(self, message: Released) -> None:
        lease = self._leases.get(message.fence)
        if lease is not None:
            lease.revoke(f"the agent released fence {message.fence} ({message.why})")
        pending = self._waiting.get(message.fence)
        if pending is not None and pending.kind == "release" and not pending.future.done():
            pending.future.set_result(message)
        elif pending is not None and not pending.future.done():
            # Thawed before the fence was even ready (its own lease ran out): no fence.
            pending.future.set_result(FenceRefused(fence=message.fence, error=f"released: {message.why}"))

    # -- requests to the agent -----------------------------------------------------------

    async def _request(self, fid: int, kind: str, message: _Message, timeout: float) -> Any:
        if self.closed:
            raise FenceError(f"agent of VM {self.name} is not connected")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[fid] = _Pending(kind, future, time.monotonic())
        self.budget.interrupt()  # a session paced for its VM's rates reads the answer now
        try:
            self.send(message)
            await asyncio.wait_for(self.writer.drain(), timeout)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._abandoned.add(fid)
            raise FenceError(
                f"agent of VM {self.name} did not answer {kind} {fid} within {timeout:.1f}s"
            ) from None
        except ConnectionError as exc:
            raise FenceError(f"agent of VM {self.name}: channel lost during {kind} {fid}: {exc}") from exc
        finally:
            self._waiting.pop(fid, None)

    async def fence(
        self, disk: Disk, ranges: RangeSet, lease_seconds: float, wait: float
    ) -> tuple[int, float, FenceReady | FenceRefused]:
        """Ask for a fence on ``disk`` over ``ranges``; the answer and when it was asked.

        ``wait`` bounds the wait for the answer: past it the fence is useless (the lease
        counts from the send time) and a late ``fence_ready`` is released at once.
        """
        if len(ranges) > MAX_RANGES_PER_RECORD:
            raise ValueError(f"a fence covers at most {MAX_RANGES_PER_RECORD} ranges, not {len(ranges)}")
        fid = next_fence_id()
        message = Fence(
            fence=fid,
            disk=disk.id,
            ranges=ranges_to_pairs(ranges),
            lease_ms=max(1, int(lease_seconds * 1000)),
        )
        sent_at = time.monotonic()
        reply = await self._request(fid, "fence", message, wait)
        return fid, sent_at, reply

    def hold(self, fid: int, lease: Lease) -> None:
        """Revoke ``lease`` if the channel drops or the agent thaws fence ``fid``."""
        if self.closed:
            lease.revoke(f"channel to VM {self.name} closed")
        self._leases[fid] = lease

    async def release(self, fid: int) -> str | None:
        """End fence ``fid``; the agent's reason, or ``None`` if it did not answer."""
        lease = self._leases.pop(fid, None)
        if lease is not None:
            lease.revoke("released by the host")
        if self.closed:
            return None
        try:
            reply = await self._request(fid, "release", Release(fence=fid), RELEASE_WAIT)
        except FenceError as exc:
            event(logging.WARNING, "fence.release_unanswered", vm=self.name, fence=fid, error=str(exc))
            return None
        return str(reply.why)

    async def trim(self, disk: Disk, ranges: RangeSet, timeout: float) -> TrimDone | FenceRefused:
        """Guest-trim mode: ask the agent to FITRIM exactly ``ranges`` of ``disk``."""
        fid = next_fence_id()
        reply: TrimDone | FenceRefused = await self._request(
            fid, "trim", Trim(fence=fid, disk=disk.id, ranges=ranges_to_pairs(ranges)), timeout
        )
        return reply

    # -- what the reclaimer and the status document ask -----------------------------------

    @property
    def live(self) -> bool:
        """Welcomed and not closed: the agent can be asked for a fence or a trim."""
        return self.welcomed and not self.closed

    def mode_of(self, disk_id: str) -> str | None:
        """``"trim"`` or ``"fence"`` as ``welcome`` told the agent, or ``None`` before it."""
        return self.info.modes.get(disk_id)

    def mismatch(self, disk_id: str) -> str | None:
        """Why the agent's disk ``disk_id`` is not this VM's disk of that name, or ``None``."""
        return self.info.mismatched.get(disk_id)

    def can_fence(self) -> bool:
        return "fence" in self.info.capabilities

    def capability_names(self) -> list[str]:
        return sorted(self.info.capabilities)

    def stop_trimming(self, disk_id: str) -> None:
        """The guest's disk takes no discards after all: reclaim it by fence from now on."""
        self.info.modes[disk_id] = "fence"

    @property
    def can_reconcile(self) -> bool:
        return self.welcomed and not self.closed and self.version >= RECONCILE_VERSION

    async def free_space(self, disk: Disk, timeout: float) -> FreeSpaceAnswer:
        """The agent's whole free space of ``disk``, validated (``reconcile``, version 2)."""
        size = self.info.sizes.get(disk.id)
        if not self.can_reconcile or size is None or disk.id in self.info.mismatched:
            why = self.info.mismatched.get(disk.id) or (
                "its size is unknown" if size is None else f"protocol version {self.version}"
            )
            raise FenceError(f"agent of VM {self.name} cannot reconcile disk {disk.id!r}: {why}")
        request, future = self._free_space.ask(disk.id, size)
        if request is not None:
            self.send(request)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            self._free_space.abandon(future)
            raise FenceError(
                f"agent of VM {self.name} did not send the free space of {disk.id!r} within {timeout:.0f}s"
            ) from None

    def describe(self) -> dict[str, Any]:
        return {
            "connected": not self.closed,
            "peer": self.peer,
            "agent": self.info.agent,
            "capabilities": sorted(self.info.capabilities),
            "connected_since": self.connected_at,
            "records": self.records,
            "rejected_records": self.rejected,
        }
