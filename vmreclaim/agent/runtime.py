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
from collections.abc import Callable
from pathlib import Path

from vmreclaim import __version__
from vmreclaim.agent import linux, reconcile
from vmreclaim.agent.fence import FenceKeeper, FenceState, Guardian
from vmreclaim.agent.logs import HoldingHandler
from vmreclaim.agent.session import Session
from vmreclaim.agent.spool import Spool
from vmreclaim.agent.watched import WatchedFs, verify
from vmreclaim.agent.watcher import FsWatcher
from vmreclaim.core import protocol as p
from vmreclaim.core.captures import Capture
from vmreclaim.core.config import AgentConfig
from vmreclaim.core.errors import AgentSetupError, ChannelError, FenceError
from vmreclaim.core.loader import load_driver
from vmreclaim.core.model import MAX_RANGES_PER_RECORD, DeletionRecord
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


class Agent:
    """Everything ``vmreclaim agent`` runs.

    A channel :class:`~vmreclaim.agent.session.Session` sees it only as the
    :class:`~vmreclaim.agent.session.AgentLink` it implements.
    """

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
            self.spool = Spool(Path(config.spool), config.spool_max_bytes)
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
            fs = WatchedFs(entry)
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

    # -- the AgentLink a session sees ------------------------------------------------------

    def disk_names(self) -> str:
        return ", ".join(repr(d) for d in sorted(self.disks)) or "none"

    def watches(self, disk: str) -> bool:
        return bool(self.disks.get(disk))

    def fence_problem(self, disk: str) -> str | None:
        if not self.can_fence:
            return "this agent cannot freeze filesystems (it needs CAP_SYS_ADMIN)"
        if any(fs.mode != "getfsmap" for fs in self.disks[disk]):
            return f"disk {disk!r} holds a filesystem without GETFSMAP: its ranges cannot be re-verified"
        return None

    def pending_records(self) -> list[tuple[int, bytes]]:
        return [(seq, line) for seq, (_disk, line) in self.spool.pending.items()]

    def record_answered(self, seq: int) -> None:
        if self.spool.remove(seq):
            self.records_changed.set()

    def release_fence(self, fence_id: int) -> str | None:
        fence = self.keeper.by_id(fence_id)
        if fence is not None:
            self.keeper.finish(fence, "release")
            log.info("fence %d on %s: released by the host", fence.id, fence.disk)
            return "release"
        if fence_id in self.keeper.finished:
            return "already-released"
        return None

    def drop_fences(self, owner: object) -> None:
        for fence in self.keeper.finish_all("error", owner=owner):
            log.warning("fence %d on %s thawed: the channel closed", fence.id, fence.disk)

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
        self, msg: p.Fence, received: float, *, owner: object, on_lease_expired: Callable[[int], None]
    ) -> p.FenceReady:
        """Freeze every watched filesystem of the disk and re-verify the asked ranges.

        The lease counts from ``received`` (docs/protocol.md) and is capped by
        ``fence_max_lease_seconds``. The returned answer is announced: from now on the
        fence's end is reported through ``on_lease_expired`` or the host's ``release``.
        """
        fss = self.disks[msg.disk]
        lease = min(msg.lease_ms / 1000.0, self.config.fence_max_lease_seconds)
        deadline = received + lease
        lease_ms = int(lease * 1000)
        fence = self.keeper.begin(msg.fence, msg.disk, fss, deadline, lease_ms, owner, on_lease_expired)
        try:
            await asyncio.to_thread(self.keeper.freeze, fence)
            if time.monotonic() >= deadline:
                raise FenceError(f"freezing took longer than the lease of {lease_ms} ms")
            ranges = await asyncio.to_thread(self._reverify, fss, p.pairs_to_ranges(msg.ranges))
            if fence.why is not None or time.monotonic() >= deadline:
                raise FenceError(f"the lease of {lease_ms} ms ran out while re-verifying")
        except BaseException:
            self.keeper.finish(fence, "error")
            raise
        ready = fence_ready(msg.fence, msg.disk, ranges, fss[0].disk_size, lease_ms)
        fence.announced = True  # the caller sends `ready` before it next yields to the loop
        log.info(
            "fence %d on %s: %d filesystem(s) frozen, %d of %d bytes still free, lease %d ms",
            msg.fence,
            msg.disk,
            len(fss),
            sum(n for _, n in ready.ranges),
            sum(n for _, n in msg.ranges),
            lease_ms,
        )
        return ready

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
        if fence.announced and fence.on_lease_expired is not None:
            fence.on_lease_expired(fence.id)

    def _hold(self) -> None:
        self.spool.hold()
        if self.logs is not None:
            self.logs.hold_output()

    def _release(self) -> None:
        self.spool.release()
        if self.logs is not None:
            self.logs.release_output()

    # -- trims -----------------------------------------------------------------------------

    async def trim(self, disk: str, ranges: RangeSet) -> tuple[int, str | None]:
        return await asyncio.to_thread(self._trim, self.disks[disk], ranges)

    async def free_space(self, request: p.Reconcile) -> list[p.FreeSpace]:
        # A worker thread: GETFSMAP of a whole fragmented filesystem takes seconds.
        return await asyncio.to_thread(reconcile.answer, request, self.disks.get(request.disk), self.pipeline)

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
                watcher = FsWatcher(
                    fs,
                    capture,
                    self.pipeline,
                    self.emit,
                    report_existing=self.config.report_existing_free_space,
                )
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


def fence_ready(fence_id: int, disk: str, ranges: RangeSet, disk_size: int, lease_ms: int) -> p.FenceReady:
    """The answer to a fence: at most the protocol's number of ranges (a subset is safe:
    the host only punches what is listed)."""
    ranges = ranges.clip(ByteRange(0, disk_size)) if disk_size else ranges
    first = next(ranges.chunks(MAX_RANGES_PER_RECORD), RangeSet())
    return p.FenceReady(fence=fence_id, disk=disk, ranges=p.ranges_to_pairs(first), lease_ms=lease_ms)
