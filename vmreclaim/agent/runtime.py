"""The agent: watchers per filesystem, the spool, the fence keeper, the channel.

One asyncio event loop runs everything that waits (event descriptors, timers, the
channel); everything that blocks on the kernel (syncfs, GETFSMAP, FIEMAP, FIFREEZE,
FITRIM) runs in worker threads: one per watched filesystem for its passes, so passes
of a filesystem never overlap, and short-lived ones for fences and trims, so a fence
never waits behind a long pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vmreclaim import __version__
from vmreclaim.agent import linux
from vmreclaim.agent.fence import FenceFailed, FenceKeeper, FenceState, Guardian
from vmreclaim.agent.filesystems import SetupError, WatchedFs, verify
from vmreclaim.agent.logs import HoldingHandler
from vmreclaim.agent.notify import MAX_EVENTS, EventSource, open_source
from vmreclaim.agent.session import Session, fence_ready
from vmreclaim.agent.spool import Spool, SpoolError
from vmreclaim.core import protocol as p
from vmreclaim.core.captures import Capture, CaptureOptions, FsEvent, FsEventKind
from vmreclaim.core.config import AgentConfig
from vmreclaim.core.errors import ChannelError, UsageError
from vmreclaim.core.loader import load_driver
from vmreclaim.core.model import DeletionRecord
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.core.transports import Transport

log = logging.getLogger("vmreclaim.agent")

#: Ranges per record (a record line stays well under the 4 MiB line limit).
RECORD_RANGES = 16384
#: Reconnect backoff: first delay and ceiling (seconds), growing by half each time. The
#: ceiling is low because a connect to a host that is not there costs nothing (a refused
#: local socket), while every second waited after the host is back delays reclaims: a
#: host restarting slowly on a busy machine must not leave agents sleeping 30 s.
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 4.0
#: A filesystem without GETFSMAP is trimmed after deletions at most this often.
FITRIM_INTERVAL = 30.0
#: After reading events, the agent waits this long before it reads again.
READ_GATHER = 0.05
#: Events for drivers that learn as they go are handed over at most this often.
EAGER_INTERVAL = 0.05
#: After a pass triggered by events, one more pass this long after (XFS background
#: inactivation, a deleted file's last close, a journal commit), unless events come first.
FOLLOW_UP = 2.0


class AgentSetupError(UsageError):
    """The agent cannot start: a filesystem, the spool or the channel is unusable."""


def has_cap_sys_admin() -> bool:
    """CAP_SYS_ADMIN (bit 21) in this process's effective set: FIFREEZE and FITRIM need it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 21 & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


class FsWatcher:
    """Events, debounce and passes of one filesystem."""

    def __init__(self, agent: Agent, fs: WatchedFs, capture: Capture) -> None:
        self.agent = agent
        self.fs = fs
        self.capture = capture
        self.options: CaptureOptions = capture.options
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"vmreclaim-pass-{fs.mount.name or 'root'}")
        self.source: EventSource | None = None
        self.events: list[FsEvent] = []
        self.eager: list[FsEvent] = []
        self.eager_scheduled = False
        self.last_eager = 0.0
        self.eager_cost = 0.0
        self.first_event: float | None = None
        self.last_event = 0.0
        self.follow_up: float | None = None
        self.wake = asyncio.Event()
        self.last_trim = 0.0
        self.trim_unsupported = False
        self.passes = 0
        self.task: asyncio.Task[None] | None = None
        self.stopped = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        fs = self.fs
        if fs.mode == "fitrim-only":
            log.warning(
                "%s: no records from this filesystem (%s); it is trimmed (FITRIM) after deletions instead%s",
                fs.mount,
                fs.problem,
                "" if fs.discard else ", which needs a disk that passes discards",
            )
        try:
            self.source, how = await loop.run_in_executor(
                self.executor,
                lambda: open_source(
                    fs.mount, self.options.events, want_paths=self.capture.capabilities.needs_paths
                ),
            )
        except OSError as exc:
            raise AgentSetupError(f"{fs.mount}: no event source ({self.options.events}): {exc}") from exc
        log.info("watching %s with %s; capture %s", fs.describe(), how, type(self.capture).__name__)
        await loop.run_in_executor(self.executor, self._begin)
        if self.source is not None:
            loop.add_reader(self.source.fileno(), self._readable)
        self.task = asyncio.create_task(self._run())

    def _begin(self) -> None:
        """The first pass: report what is free already (or take it as the baseline)."""
        fs, agent = self.fs, self.agent
        if fs.mode != "getfsmap":
            self.capture.begin(fs, RangeSet())
            return
        whole = RangeSet.from_ranges([(0, fs.size)])
        if agent.config.report_existing_free_space:
            v = verify(fs, agent.pipeline.captured(str(fs.entry.mount), fs.device, whole), agent.pipeline)
            self._report(v.found, "already free at start")
            baseline = v.free
        else:
            fs.commit()
            baseline = fs.free_space()
        self.capture.begin(fs, baseline)

    def _readable(self) -> None:
        assert self.source is not None
        try:
            events = self.source.read()
        except OSError as exc:
            log.error("%s: reading events failed: %s", self.fs.mount, exc)
            return
        # Let events gather in the kernel's queue for a moment before the next read:
        # woken for each one, the agent would pay a wake-up per unlink of an rm -rf,
        # and queued events of one directory merge into one.
        fd = self.source.fileno()
        loop = self.agent.loop
        loop.remove_reader(fd)
        loop.call_later(READ_GATHER, self._rearm, fd)
        if not events:
            return
        now = time.monotonic()
        if self.capture.capabilities.eager_writes:
            # In order, at most every EAGER_INTERVAL: a burst of writes costs one look.
            self.eager += events
            if len(self.eager) > MAX_EVENTS:
                self.eager = [FsEvent(FsEventKind.OVERFLOW)]
            if not self.eager_scheduled:
                self.eager_scheduled = True
                # A driver whose look is slow (GETFSMAP of a huge, fragmented
                # filesystem) is asked less often: at most a fifth of a thread.
                interval = max(EAGER_INTERVAL, 4 * self.eager_cost)
                delay = max(0.0, self.last_eager + interval - now)
                self.agent.loop.call_later(delay, self._flush_eager)
        else:
            self.events += events
            if len(self.events) > MAX_EVENTS:
                self.events = [FsEvent(FsEventKind.OVERFLOW)]
        if self.first_event is None:
            self.first_event = now
        self.last_event = now
        self.wake.set()

    def _rearm(self, fd: int) -> None:
        if self.source is not None and self.source.fileno() == fd and not self.stopped:
            self.agent.loop.add_reader(fd, self._readable)

    def _flush_eager(self) -> None:
        self.eager_scheduled = False
        self.last_eager = time.monotonic()
        events, self.eager = self.eager, []
        if events:
            self.executor.submit(self._observe, events)

    def _observe(self, events: list[FsEvent]) -> None:
        start = time.monotonic()
        try:
            self.capture.observe(events)
        except Exception:
            log.exception("%s: capture driver failed on events", self.fs.mount)
        self.eager_cost = time.monotonic() - start

    async def _run(self) -> None:
        opts = self.options
        scan_at = time.monotonic() + opts.scan_seconds if opts.scan_seconds else None
        while True:
            now = time.monotonic()
            due: float | None
            if self.first_event is not None:
                due = min(self.last_event + opts.debounce_seconds, self.first_event + opts.max_delay_seconds)
                reason = "events"
            else:
                timers = [
                    (t, r) for t, r in ((self.follow_up, "follow-up"), (scan_at, "scan")) if t is not None
                ]
                due, reason = min(timers) if timers else (None, "")
            if due is None or due > now:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), None if due is None else due - now)
                continue
            if reason == "events":
                self.first_event = None
                self.follow_up = time.monotonic() + max(FOLLOW_UP, 4 * opts.debounce_seconds)
            elif reason == "follow-up":
                self.follow_up = None
            else:
                scan_at = time.monotonic() + opts.scan_seconds
            if self.eager:  # learn from every event already read before this pass
                self.executor.submit(self._observe, self.eager)
                self.eager = []
            events, self.events = self.events, []
            if reason == "scan":
                events.append(FsEvent(FsEventKind.SCAN))
            await asyncio.get_running_loop().run_in_executor(self.executor, self._pass, events, reason)

    def _pass(self, events: list[FsEvent], reason: str) -> None:
        fs, agent = self.fs, self.agent
        self.passes += 1
        try:
            if events:
                self.capture.observe(events)
            if fs.mode == "fitrim-only":
                self._fitrim_only(reason)
                return
            candidates = agent.pipeline.captured(str(fs.entry.mount), fs.device, self.capture.candidates())
            if not candidates:
                return
            v = verify(fs, candidates, agent.pipeline)
            self.capture.settle(v.window, v.free)
            self._report(v.found, reason)
        except Exception:
            log.exception("%s: pass (%s) failed", fs.mount, reason)

    def _report(self, found: RangeSet, reason: str) -> None:
        assert self.fs.diskmap is not None
        disk_ranges = self.fs.diskmap.to_disk(found)
        if disk_ranges:
            self.agent.loop.call_soon_threadsafe(self.agent.emit, self.fs, disk_ranges, reason)

    def _fitrim_only(self, reason: str) -> None:
        now = time.monotonic()
        if reason == "scan" or self.trim_unsupported:
            return
        if now - self.last_trim < FITRIM_INTERVAL:
            self.follow_up = self.last_trim + FITRIM_INTERVAL  # trim then, once
            return
        self.last_trim = now
        try:
            self.fs.commit()  # freed blocks are only trimmable once committed
            trimmed = linux.fitrim(self.fs.fd, 0, 2**64 - 1, 0)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                log.info("%s: FITRIM not supported (the disk passes no discards)", self.fs.mount)
                self.trim_unsupported = True
            else:
                log.error("%s: FITRIM failed: %s", self.fs.mount, exc.strerror)
            return
        log.info("%s: FITRIM after deletions: kernel reports %d bytes", self.fs.mount, trimmed)

    async def stop(self) -> None:
        self.stopped = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.source is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.source.fileno())
            self.source.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


class Agent:
    """Everything ``vmreclaim agent`` runs."""

    def __init__(
        self, config: AgentConfig, *, pipeline: Pipeline | None = None, logs: HoldingHandler | None = None
    ):
        self.config = config
        self.pipeline = pipeline or Pipeline()
        self.logs = logs
        self.can_fence = has_cap_sys_admin()
        self.filesystems: list[WatchedFs] = []
        self.disks: dict[str, list[WatchedFs]] = {}
        self.vm = ""
        self.session: Session | None = None
        self._stopping: asyncio.Event | None = None
        try:
            self._open_filesystems()
            self.transport = load_driver(
                "transports", config.transport.driver, Transport, config.transport.options
            )
            try:
                self.spool = Spool(Path(config.spool), config.spool_max_bytes)
            except SpoolError as exc:
                raise AgentSetupError(str(exc)) from exc
        except BaseException:
            for fs in self.filesystems:
                fs.close()
            raise
        self.keeper = FenceKeeper(
            on_expired=self._expired_threadsafe,
            hold=self._hold,
            release=self._release,
            guardian=Guardian() if self.can_fence else None,
        )

    def _open_filesystems(self) -> None:
        seen: dict[int, Path] = {}
        disk_of: dict[str, str] = {}
        for entry in self.config.filesystems:
            try:
                fs = WatchedFs(entry)
            except SetupError as exc:
                raise AgentSetupError(str(exc)) from exc
            self.filesystems.append(fs)
            if fs.dev in seen:
                raise AgentSetupError(f"filesystems {seen[fs.dev]} and {entry.mount} are the same filesystem")
            seen[fs.dev] = entry.mount
            if fs.diskmap is not None:
                # One disk id must mean one disk, or a fence would freeze the wrong set.
                other = disk_of.setdefault(fs.disk_id, fs.diskmap.disk.name)
                if other != fs.diskmap.disk.name:
                    raise AgentSetupError(
                        f"disk id {fs.disk_id!r} is given to filesystems on two disks ({other} and "
                        f"{fs.diskmap.disk.name})"
                    )
            self.disks.setdefault(fs.disk_id, []).append(fs)

    def disk_names(self) -> str:
        return ", ".join(repr(d) for d in sorted(self.disks)) or "none"

    # -- messages --------------------------------------------------------------------------

    def hello(self) -> p.Hello:
        caps = []
        if any(fs.mode == "getfsmap" for fs in self.filesystems):
            caps.append("records")
        if self.can_fence:
            caps += ["fence", "trim"]
        disks = [
            p.HelloDisk(
                id=disk,
                mounts=[str(fs.entry.mount) for fs in fss],
                fs=",".join(sorted({fs.fstype for fs in fss})),
                discard=any(fs.discard for fs in fss),
                size=fss[0].disk_size,
                verify="getfsmap" if all(fs.mode == "getfsmap" for fs in fss) else "fitrim-only",
            )
            for disk, fss in sorted(self.disks.items())
        ]
        return p.Hello(
            v=p.PROTOCOL_VERSION,
            agent=f"vmreclaim-agent {__version__} ({socket.gethostname()})"[:128],
            capabilities=caps,
            disks=disks,
        )

    def welcomed(self, welcome: p.Welcome) -> None:
        self.vm = welcome.vm
        known = {d.id: d for d in welcome.disks}
        log.info("connected: the host calls this VM %r; disks %s", welcome.vm, sorted(known) or "none")
        for disk, fss in self.disks.items():
            host = known.get(disk)
            if host is None:
                log.warning("the host does not know disk %r: its records will be refused", disk)
            elif host.size and fss[0].disk_size and host.size != fss[0].disk_size:
                log.warning(
                    "disk %r is %d bytes here but %d bytes to the host: is it the same disk?",
                    disk,
                    fss[0].disk_size,
                    host.size,
                )

    def emit(self, fs: WatchedFs, ranges: RangeSet, reason: str) -> None:
        """Turn verified virtual-disk ranges into spooled records (event loop thread)."""
        seqs = []
        for chunk in ranges.chunks(RECORD_RANGES):
            seq = self.spool.reserve()
            record = DeletionRecord(vm=self.vm, disk=fs.disk_id, ranges=chunk, fs=fs.fstype, seq=seq)
            self.spool.add(seq, fs.disk_id, p.encode(p.RecordMessage(record=record.to_json())))
            seqs.append(seq)
        log.info(
            "%s: %d bytes in %d ranges verified free (%s): record%s %s",
            fs.mount,
            ranges.total,
            len(ranges),
            reason,
            "s" if len(seqs) > 1 else "",
            ", ".join(map(str, seqs)),
        )
        self.records_changed.set()

    # -- fences ----------------------------------------------------------------------------

    async def fence(
        self, msg: p.Fence, fss: list[WatchedFs], deadline: float, lease_ms: int, owner: object
    ) -> tuple[FenceState, p.FenceReady]:
        fence = self.keeper.begin(msg.fence, msg.disk, fss, deadline, lease_ms, owner)
        try:
            await asyncio.to_thread(self.keeper.freeze, fence)
            if time.monotonic() >= deadline:
                raise FenceFailed(f"freezing took longer than the lease of {lease_ms} ms")
            ranges = await asyncio.to_thread(self._reverify, fss, p.pairs_to_ranges(msg.ranges))
            if fence.why is not None or time.monotonic() >= deadline:
                raise FenceFailed(f"the lease of {lease_ms} ms ran out while re-verifying")
        except BaseException:
            self.keeper.finish(fence, "error")
            raise
        ready = fence_ready(msg.fence, msg.disk, ranges, fss[0].disk_size, lease_ms)
        log.info(
            "fence %d on %s: %d filesystem(s) frozen, %d of %d bytes still free, lease %d ms",
            msg.fence,
            msg.disk,
            len(fss),
            sum(n for _, n in ready.ranges),
            sum(n for _, n in msg.ranges),
            lease_ms,
        )
        return fence, ready

    def _reverify(self, fss: list[WatchedFs], ranges: RangeSet) -> RangeSet:
        """Under the freeze: the asked disk ranges that are free in a watched filesystem."""
        out = RangeSet()
        for fs in fss:
            assert fs.diskmap is not None
            device = fs.diskmap.to_device(ranges)
            if device:
                found = verify(fs, device, self.pipeline, frozen=True).found
                out = out.union(fs.diskmap.to_disk(found))
        return out.intersect(ranges)

    def _expired_threadsafe(self, fence: FenceState) -> None:
        """Watchdog thread: the fence is thawed already; tell the loop."""
        self.loop.call_soon_threadsafe(self._expired, fence)

    def _expired(self, fence: FenceState) -> None:
        self.keeper.finish(fence, "lease")
        log.warning("fence %d on %s: lease ran out before the host released it; thawed", fence.id, fence.disk)
        owner = fence.owner
        if fence.announced and isinstance(owner, Session):
            owner.lease_ran_out(fence.id)

    def _hold(self) -> None:
        self.spool.hold()
        if self.logs is not None:
            self.logs.hold_output()

    def _release(self) -> None:
        self.spool.release()
        if self.logs is not None:
            self.logs.release_output()

    # -- trims -----------------------------------------------------------------------------

    async def trim(self, fss: list[WatchedFs], ranges: RangeSet) -> tuple[int, str | None]:
        return await asyncio.to_thread(self._trim, fss, ranges)

    def _trim(self, fss: list[WatchedFs], ranges: RangeSet) -> tuple[int, str | None]:
        total = 0
        errors: list[str] = []
        for fs in fss:
            if fs.diskmap is None:
                errors.append(f"{fs.mount}: no map to the disk")
                continue
            for r in fs.diskmap.to_device(ranges).clip(ByteRange(0, fs.size)):
                try:
                    total += linux.fitrim(fs.fd, r.start, r.length, 0)
                except OSError as exc:
                    if exc.errno == errno.EINVAL:
                        continue  # shorter than a block: nothing to trim
                    errors.append(f"{fs.mount}: FITRIM {r}: {exc.strerror}")
                    if exc.errno in (errno.EOPNOTSUPP, errno.EPERM):
                        break
        return total, "; ".join(errors)[:1024] or None

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.records_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stopping.set)
        if self.keeper.guardian is not None:
            self.keeper.guardian.start()
        if not self.can_fence:
            log.warning(
                "no CAP_SYS_ADMIN: the agent cannot fence or trim; the host must punch offline or not at all"
            )
        watchers = []
        try:
            for fs in self.filesystems:
                capture = load_driver(
                    "captures", self.config.capture.driver, Capture, self.config.capture.options
                )
                watcher = FsWatcher(self, fs, capture)
                watchers.append(watcher)
                await watcher.start()
            log.info(
                "agent %s started: %d filesystem(s), disks %s, %d spooled record(s), channel %s",
                __version__,
                len(self.filesystems),
                self.disk_names(),
                len(self.spool.pending),
                self.transport.describe(),
            )
            channel = asyncio.create_task(self._channel())
            await self._stopping.wait()
            channel.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await channel
        finally:
            self.keeper.close()
            for watcher in watchers:
                await watcher.stop()
            self.spool.close()
            for fs in self.filesystems:
                fs.close()
            log.info("agent stopped")
        return 0

    async def _channel(self) -> None:
        """Connect, talk, and reconnect with exponential backoff (jittered)."""
        delay = BACKOFF_FIRST
        while True:
            try:
                reader, writer = await self.transport.connect()
            except ChannelError as exc:
                log.info("channel %s: %s; retrying in %.1fs", self.transport.describe(), exc, delay)
            else:
                session = Session(self, reader, writer)
                self.session = session
                try:
                    await session.run()
                finally:
                    self.session = None
                if session.welcomed:
                    delay = BACKOFF_FIRST
                log.info("channel %s closed; reconnecting in %.1fs", self.transport.describe(), delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 1.5, BACKOFF_MAX)
