"""One watched filesystem: its events, their debounce, and the passes they trigger.

A pass asks the capture driver for candidate free ranges, has the pipeline's capture
filter narrow them, verifies them (``syncfs`` + GETFSMAP, the verify filter), and hands
what is verified free, in bytes of the virtual disk, to ``emit`` on the event loop. A
filesystem without GETFSMAP is trimmed (FITRIM) after deletions instead. The watcher
knows the agent only through what it is handed: the pipeline and ``emit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from vmreclaim.agent import linux
from vmreclaim.agent.notify import MAX_EVENTS, EventSource, open_source
from vmreclaim.agent.watched import WatchedFs, verify
from vmreclaim.core.captures import Capture, CaptureOptions, FsEvent, FsEventKind
from vmreclaim.core.errors import AgentSetupError
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.ranges import RangeSet

log = logging.getLogger("vmreclaim.agent")

#: A filesystem without GETFSMAP is trimmed after deletions at most this often.
FITRIM_INTERVAL = 30.0
#: After reading events, the agent waits this long before it reads again.
READ_GATHER = 0.05
#: Events for drivers that learn as they go are handed over at most this often.
EAGER_INTERVAL = 0.05
#: After a pass triggered by events, one more pass this long after (XFS background
#: inactivation, a deleted file's last close, a journal commit), unless events come first.
FOLLOW_UP = 2.0

#: ``emit(fs, disk_ranges, reason)``: verified free ranges of the virtual disk, on the loop.
Emit = Callable[[WatchedFs, RangeSet, str], None]


class FsWatcher:
    """Events, debounce and passes of one filesystem."""

    def __init__(
        self,
        fs: WatchedFs,
        capture: Capture,
        pipeline: Pipeline,
        emit: Emit,
        *,
        report_existing: bool,
    ) -> None:
        self.fs = fs
        self.pipeline = pipeline
        self.emit = emit
        self.report_existing = report_existing
        self.loop = asyncio.get_running_loop()
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
        loop = self.loop
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
        fs, pipeline = self.fs, self.pipeline
        if fs.mode != "getfsmap":
            self.capture.begin(fs, RangeSet())
            return
        whole = RangeSet.from_ranges([(0, fs.size)])
        if self.report_existing:
            v = verify(fs, pipeline.captured(str(fs.entry.mount), fs.device, whole), pipeline)
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
        loop = self.loop
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
                self.loop.call_later(delay, self._flush_eager)
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
            self.loop.add_reader(fd, self._readable)

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
            await self.loop.run_in_executor(self.executor, self._pass, events, reason)

    def _pass(self, events: list[FsEvent], reason: str) -> None:
        fs, pipeline = self.fs, self.pipeline
        self.passes += 1
        try:
            if events:
                self.capture.observe(events)
            if fs.mode == "fitrim-only":
                self._fitrim_only(reason)
                return
            candidates = pipeline.captured(str(fs.entry.mount), fs.device, self.capture.candidates())
            if not candidates:
                return
            v = verify(fs, candidates, pipeline)
            self.capture.settle(v.window, v.free)
            self._report(v.found, reason)
        except Exception:
            log.exception("%s: pass (%s) failed", fs.mount, reason)

    def _report(self, found: RangeSet, reason: str) -> None:
        assert self.fs.diskmap is not None
        disk_ranges = self.fs.diskmap.to_disk(found)
        if disk_ranges:
            self.loop.call_soon_threadsafe(self.emit, self.fs, disk_ranges, reason)

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
                self.loop.remove_reader(self.source.fileno())
            self.source.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
