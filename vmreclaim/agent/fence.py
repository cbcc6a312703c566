"""Fences: freeze the filesystems of a disk, re-verify under the freeze, always thaw.

DESIGN.md section 4, rule 2: a block verified free must stay free until the host has
punched it. In fenced host-punch mode the agent freezes (FIFREEZE) every watched
filesystem on the disk, so nothing can allocate; the host punches within the lease;
the agent thaws on the host's ``release`` or when the lease runs out, whichever comes
first. The lease counts from when the agent *received* the request (docs/protocol.md).

Three things thaw, so that no single failure leaves a guest's filesystem frozen:

* the event loop, on ``release``, on a dropped channel, on shutdown;
* a **watchdog thread** (:class:`FenceKeeper`), at the deadline, even if the loop is
  stuck — it does the FITHAW itself and only then tells the loop;
* the **guardian process** (:mod:`vmreclaim.agent.guardian`), shortly after the
  deadline or at once if the agent process dies.

A thaw is idempotent and serialised per fence by a lock; a FIFREEZE still under way
when the deadline passes is thawed by the thread that issued it, as soon as it returns.
While any fence is up the agent's spool and logs are held in memory (``hold``/``release``
callbacks): writing to a frozen filesystem would block.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from vmreclaim.agent import linux
from vmreclaim.agent.watched import WatchedFs
from vmreclaim.core.errors import FenceError

log = logging.getLogger("vmreclaim.agent")

#: The guardian acts this long after a fence's deadline: normally the agent has thawed.
GUARDIAN_GRACE = 0.5
#: Fence ids remembered after they end, to answer a late ``release`` idempotently.
FINISHED_MEMORY = 1024


@dataclass
class _Member:
    fs: WatchedFs
    #: idle → freezing → frozen → thawed; "expired": the deadline passed mid-FIFREEZE.
    state: str = "idle"


@dataclass(eq=False)
class FenceState:
    """One fence on one disk: the filesystems frozen for it and its deadline."""

    id: int
    disk: str
    deadline: float
    lease_ms: int
    members: list[_Member]
    #: Whose fence it is (a channel session): its fences are thawed when it closes.
    owner: object = None
    #: Called with the fence id when the lease runs out after ``fence_ready`` was sent,
    #: so the owner can report the end with ``released``.
    on_lease_expired: Callable[[int], None] | None = None
    #: ``fence_ready`` was sent: its end must be reported with ``released``.
    announced: bool = False
    #: Why it ended (``release``, ``lease``, ``error``), ``None`` while up.
    why: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def filesystems(self) -> list[WatchedFs]:
        return [m.fs for m in self.members]

    def thaw(self, why: str) -> bool:
        """Thaw every member frozen so far; True if this call ended the fence."""
        with self.lock:
            if self.why is not None:
                return False
            self.why = why
            for m in self.members:
                if m.state == "frozen":
                    _thaw(m.fs)
                    m.state = "thawed"
                elif m.state == "freezing":
                    m.state = "expired"  # its FIFREEZE thread thaws when the ioctl returns
            return True


def _thaw(fs: WatchedFs) -> None:
    try:
        linux.thaw(fs.fd)
    except OSError as exc:
        log.error("thaw %s failed: %s", fs.mount, exc.strerror or exc)


class Guardian:
    """The agent's handle on the guardian process (started lazily, restarted if it died)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._ensure()

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-B", "-m", "vmreclaim.agent.guardian"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        return self.proc

    def _send(self, text: str) -> None:
        with self._lock:
            try:
                proc = self._ensure()
                assert proc.stdin is not None
                proc.stdin.write(text.encode("utf-8", "surrogateescape"))
                proc.stdin.flush()
            except OSError as exc:
                log.error("thaw guardian: cannot reach it (%s); the watchdog thread remains", exc)

    def arm(self, key: str, deadline: float, paths: list[str]) -> None:
        self._send("".join(f"arm {key} {deadline:.6f} {p}\n" for p in paths))

    def disarm(self, key: str) -> None:
        self._send(f"disarm {key}\n")

    def close(self) -> None:
        with self._lock:
            if self.proc is not None and self.proc.stdin is not None:
                try:
                    self.proc.stdin.close()
                    self.proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
            self.proc = None


class FenceKeeper:
    """Active fences, the watchdog thread that enforces their deadlines, the guardian."""

    def __init__(
        self,
        *,
        on_expired: Callable[[FenceState], None],
        hold: Callable[[], None],
        release: Callable[[], None],
        guardian: Guardian | None = None,
    ) -> None:
        self.on_expired = on_expired
        self._hold, self._release = hold, release
        self.guardian = guardian
        self.active: dict[str, FenceState] = {}
        self.finished: OrderedDict[int, str] = OrderedDict()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._watchdog, name="vmreclaim-fence-watchdog", daemon=True)
        self._thread.start()

    def by_id(self, fence_id: int) -> FenceState | None:
        with self._cond:
            return next((f for f in self.active.values() if f.id == fence_id), None)

    def begin(
        self,
        fence_id: int,
        disk: str,
        filesystems: list[WatchedFs],
        deadline: float,
        lease_ms: int,
        owner: object,
        on_lease_expired: Callable[[int], None] | None = None,
    ) -> FenceState:
        """Register a fence (watchdog and guardian armed) before anything is frozen."""
        members = [_Member(fs) for fs in filesystems]
        fence = FenceState(fence_id, disk, deadline, lease_ms, members, owner, on_lease_expired)
        with self._cond:
            if disk in self.active:
                raise FenceError(f"disk {disk!r} is already fenced (fence {self.active[disk].id})")
            self.active[disk] = fence
            self._cond.notify_all()
        self._hold()
        if self.guardian is not None:
            self.guardian.arm(
                self._key(fence), deadline + GUARDIAN_GRACE, [str(fs.mount) for fs in filesystems]
            )
        return fence

    def freeze(self, fence: FenceState) -> None:
        """FIFREEZE every member in turn (blocking: run it in a worker thread)."""
        for m in fence.members:
            with fence.lock:
                if fence.why is not None:
                    raise FenceError(f"the fence ended ({fence.why}) while freezing")
                m.state = "freezing"
            try:
                linux.freeze(m.fs.fd)
            except OSError as exc:
                with fence.lock:
                    m.state = "idle"
                reason = "already frozen by someone else" if exc.errno == 16 else exc.strerror or str(exc)
                raise FenceError(f"FIFREEZE {m.fs.mount}: {reason}") from exc
            with fence.lock:
                if m.state == "expired":
                    _thaw(m.fs)
                    m.state = "thawed"
                    raise FenceError(f"the lease ran out while {m.fs.mount} was being frozen")
                m.state = "frozen"

    def finish(self, fence: FenceState, why: str) -> bool:
        """End a fence: thaw (if still frozen), forget it, release holds. True if this
        call thawed it (False: it had already ended, e.g. by the watchdog)."""
        thawed = fence.thaw(why)
        with self._cond:
            if self.active.get(fence.disk) is not fence:
                return thawed
            del self.active[fence.disk]
            self.finished[fence.id] = fence.why or why
            while len(self.finished) > FINISHED_MEMORY:
                self.finished.popitem(last=False)
        if self.guardian is not None:
            self.guardian.disarm(self._key(fence))
        self._release()
        return thawed

    def finish_all(self, why: str, owner: object = None) -> list[FenceState]:
        """End every fence (of ``owner`` if given): the channel dropped, or shutdown."""
        with self._cond:
            fences = [f for f in self.active.values() if owner is None or f.owner is owner]
        for fence in fences:
            self.finish(fence, why)
        return fences

    def close(self) -> None:
        self.finish_all("error")
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        if self.guardian is not None:
            self.guardian.close()

    @staticmethod
    def _key(fence: FenceState) -> str:
        return f"{os.getpid()}.{fence.id}"

    def _watchdog(self) -> None:
        """Thaw at the deadline, whatever the event loop is doing."""
        while True:
            with self._cond:
                if self._stop:
                    return
                now = time.monotonic()
                due = [f for f in self.active.values() if f.deadline <= now and f.why is None]
                if not due:
                    pending = [f.deadline for f in self.active.values() if f.why is None]
                    self._cond.wait(timeout=max(0.0, min(pending) - now) if pending else None)
                    continue
            for fence in due:
                if fence.thaw("lease"):
                    try:
                        self.on_expired(fence)
                    except Exception:
                        log.exception("fence %d: after its lease ran out", fence.id)
