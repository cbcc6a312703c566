"""Per-VM budgets: what one guest may cost the host daemon (DESIGN.md section 4, last
paragraph; issue 11 item 4).

Every guest is untrusted and all of them share one daemon: one event loop, one database
thread, one descriptor table, one log. Each VM therefore gets its own allowance of each,
and a VM that exceeds one is slowed or refused on its own channel only:

========================  =============================================================
connections per VM        :attr:`Limits.connections_per_vm` at once, pre-handshake
                          included; more are closed at once (no descriptor, no buffer)
lines per second          a token bucket per VM: past it the session stops reading,
bytes per second          so the guest's own socket fills and its sender blocks
event-loop time           the time the daemon spent on the VM's lines, as a share of a
                          core (the same bucket mechanism): cheap lines and costly ones
                          (deep JSON, long errors) cost each VM what they cost
ranges in flight          ranges received but not yet committed, per VM: past it the
                          session stops reading until its commits catch up
ranges held per disk      :attr:`Limits.ranges_per_disk`; past it records are nacked
duplicates                a record whose ranges are already durable and pending is
                          acknowledged without being stored again
                          (:meth:`~vmreclaim.host.pending.PendingRanges.covers`); an
                          identical one still in flight rides on the first one's commit
log lines                 :func:`vmreclaim.host.logs.guest_event` per VM and minute
========================  =============================================================

All limits live in :class:`Limits`; :data:`DEFAULT_LIMITS` is what the daemon uses. The
memory these bounds add up to is stated (and measured) in docs/host.md, *Budgets*.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from vmreclaim.core.transports import MAX_LINE_BYTES


@dataclass(frozen=True)
class Limits:
    """Every per-VM limit of the host daemon, in one place."""

    #: Connections of one VM at once, before and after the handshake (an agent that
    #: reconnects while its old connection lingers needs two).
    connections_per_vm: int = 3
    #: Lines (of any type) per second a VM's session reads, and the burst it may send
    #: (a real agent sends a record per verification pass, some tens a second; after an
    #: outage it replays its spool 32 records at a time).
    lines_per_second: float = 2000.0
    line_burst: float = 4000.0
    #: Bytes per second a VM's session reads; the burst admits two lines of the maximum
    #: size (4 MiB) at once.
    bytes_per_second: float = 4 * 1024 * 1024
    byte_burst: float = 2 * MAX_LINE_BYTES
    #: Share of one core the event loop may spend on a VM's lines (parsing, validating,
    #: storing, answering), and the burst in seconds.
    cpu_share: float = 0.05
    cpu_burst: float = 0.1
    #: Ranges of one VM received but not yet committed; each record counts
    #: ``RECORD_OVERHEAD_RANGES`` more (its objects), so many one-range records are bounded too.
    inflight_ranges_per_vm: int = 200_000
    #: Pending ranges one disk may hold (memory and database); past it records are nacked.
    ranges_per_disk: int = 250_000
    #: Log lines a VM's channel may cause per minute; the rest are counted, then summed
    #: up in one line. Strings a guest chose are cut to ``log_field_chars``.
    log_lines_per_minute: int = 30
    log_field_chars: int = 256


#: The daemon's limits (tests replace it before starting a daemon).
DEFAULT_LIMITS = Limits()

#: What a record in flight costs beyond its ranges, counted in ranges (about 1 KiB).
RECORD_OVERHEAD_RANGES = 64

#: The daemon's own memory with no VM: the interpreter, numpy, pydantic, SQLite's cache,
#: the thread pools, and the transient objects of parsing one maximal line (a 4 MiB
#: record of 65,536 ranges is some 40 MiB of Python objects while it is validated; lines
#: are parsed one at a time on the event loop, so this is paid once per host).
HOST_BASE_BYTES = 200 * 1024 * 1024
#: Bytes per pending range of a disk: the merged start/end arrays, a merge's temporary
#: copies, and the per-record bookkeeping of one-range records (measured, rounded up).
BYTES_PER_PENDING_RANGE = 160


def memory_bound(vms: int, disks_per_vm: int = 1, limits: Limits | None = None) -> int:
    """The daemon's resident memory bound for ``vms`` VMs whatever their guests send
    (docs/host.md, *Budgets*; measured by tests/host/test_hostile_guests.py).

    Per VM: its connections' stream buffers (asyncio pauses a socket at twice the 4 MiB
    line limit, plus the line being split), its ranges in flight, its disks' pending
    ranges; per host: :data:`HOST_BASE_BYTES`.
    """
    lim = limits or DEFAULT_LIMITS
    buffers = lim.connections_per_vm * 3 * MAX_LINE_BYTES
    inflight = lim.inflight_ranges_per_vm * 16 * 3
    pending = disks_per_vm * lim.ranges_per_disk * BYTES_PER_PENDING_RANGE
    return HOST_BASE_BYTES + vms * (buffers + inflight + pending)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; :meth:`take` waits for them."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def delay(self, cost: float) -> float:
        """Take ``cost`` tokens (going into debt); how long to wait to be even again."""
        self._refill()
        self._tokens -= cost
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclass
class VMBudget:
    """What one VM's channel may still cost; shared by all of its connections."""

    limits: Limits
    connections: int = 0
    refused_connections: int = 0
    inflight_ranges: int = 0
    lines: TokenBucket = field(init=False)
    bytes: TokenBucket = field(init=False)
    cpu: TokenBucket = field(init=False)
    _room: asyncio.Event | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.lines = TokenBucket(self.limits.lines_per_second, self.limits.line_burst)
        self.bytes = TokenBucket(self.limits.bytes_per_second, self.limits.byte_burst)
        self.cpu = TokenBucket(self.limits.cpu_share, self.limits.cpu_burst)

    # -- connections -------------------------------------------------------------------

    @contextlib.contextmanager
    def connection(self) -> Iterator[bool]:
        """Hold one connection slot while the block runs; yields False (and holds
        nothing) when the VM has no slot left: the caller closes the connection."""
        if self.connections >= self.limits.connections_per_vm:
            self.refused_connections += 1
            yield False
            return
        self.connections += 1
        try:
            yield True
        finally:
            self.connections -= 1

    # -- reading -----------------------------------------------------------------------

    async def pace(self, nbytes: int) -> None:
        """A line of ``nbytes`` was read: wait as long as the VM is over its rates."""
        wait = max(self.lines.delay(1), self.bytes.delay(nbytes), self.cpu.delay(0))
        if wait > 0:
            await asyncio.sleep(wait)

    def charge(self, seconds: float) -> None:
        """The event loop spent ``seconds`` on one of the VM's lines: paid before its next."""
        self.cpu.delay(seconds)

    def hold(self, ranges: int) -> None:
        """A record of ``ranges`` ranges was handed to the committer."""
        self.inflight_ranges += ranges + RECORD_OVERHEAD_RANGES

    def release(self, ranges: int) -> None:
        """A record of ``ranges`` ranges was committed (or failed)."""
        self.inflight_ranges -= ranges + RECORD_OVERHEAD_RANGES
        if self._room is not None and self.inflight_ranges <= self.limits.inflight_ranges_per_vm // 2:
            self._room.set()

    async def room(self) -> None:
        """Wait while the VM has too many ranges waiting for a commit."""
        if self.inflight_ranges <= self.limits.inflight_ranges_per_vm:
            return
        if self._room is None:
            self._room = asyncio.Event()
        self._room.clear()
        await self._room.wait()


class Budgets:
    """The :class:`VMBudget` of every VM (kept across reconnects, dropped with the VM)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or DEFAULT_LIMITS
        self._vms: dict[str, VMBudget] = {}

    def vm(self, name: str) -> VMBudget:
        budget = self._vms.get(name)
        if budget is None:
            budget = self._vms[name] = VMBudget(self.limits)
        return budget

    def forget(self, name: str) -> None:
        self._vms.pop(name, None)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one (the unit's ``LimitNOFILE``);
    returns the limits now in force. A daemon started by hand keeps working with what
    it was given."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard
