"""The captures plugin kind: how the guest agent learns which blocks may have been freed.

A capture driver (entry-point group ``vmreclaim.captures``) watches one filesystem and
proposes *candidate* byte ranges of its device; it never decides what is reported. The
agent runs every pass the same way (DESIGN.md section 4, rule 1)::

    events ─► driver.observe()          (learn: a file was written, deleted, moved)
    debounce ─► driver.candidates()     ─► vmreclaim_capture_filter
              ─► verify (statfs, syncfs, GETFSMAP free ∩ candidates, syncfs)
              ─► vmreclaim_verify_filter ─► record (virtual-disk offsets) ─► host
              ─► driver.settle(window, free)   (what was free in the window looked at)

so a driver that proposes too much costs a little time, and one that proposes too
little only leaves space unreclaimed; neither can get a used block reported.

The agent owns the event sources (fanotify with a filesystem mark, else inotify over
the tree, plus a periodic scan) and the Linux calls, and hands each driver a
:class:`CaptureTarget` for its filesystem: plugins import only ``vmreclaim.core``.
One driver instance serves one filesystem; all its methods are called from one worker
thread of that filesystem, never concurrently.
"""

from __future__ import annotations

import enum
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Protocol

from pydantic import Field

from vmreclaim.core.driver import Driver, DriverOptions
from vmreclaim.core.ranges import ByteRange, RangeSet


class FsEventKind(enum.Enum):
    """What happened in a watched filesystem."""

    #: A directory entry was removed (unlink, rmdir) or an inode lost its last link.
    DELETED = "deleted"
    #: A file opened for writing was closed (it may have grown, shrunk or been rewritten).
    WRITTEN = "written"
    #: A file's data changed or it was truncated, while it may still be open: frequent
    #: (every ``write(2)``), so drivers note it and act at the next pass, not per event.
    MODIFIED = "modified"
    #: A directory entry was renamed (a rename may replace, and so free, another file).
    MOVED = "moved"
    #: The kernel dropped events (queue overflow): anything may have happened.
    OVERFLOW = "overflow"
    #: The periodic backstop scan: no event, but look again.
    SCAN = "scan"


@dataclass(frozen=True)
class FsEvent:
    """One event; ``path`` and ``inode`` are set when the event source knows them."""

    kind: FsEventKind
    path: Path | None = None
    inode: int | None = None
    is_dir: bool = False


@dataclass(frozen=True)
class FileExtents:
    """Where a regular file's data lies on the filesystem's device (FIEMAP)."""

    inode: int
    #: Plain extents owned by this file alone, device bytes.
    ranges: RangeSet
    #: Extents shared with other files (reflink): never candidates when it is deleted.
    shared: RangeSet


class CaptureTarget(Protocol):
    """One watched filesystem, as the agent hands it to a capture driver."""

    @property
    def mount(self) -> Path:
        """The mount point, as configured."""

    @property
    def device(self) -> str:
        """The block device holding the filesystem (``/dev/vda1``)."""

    @property
    def fstype(self) -> str:
        """``ext4``, ``xfs``, ..."""

    @property
    def size(self) -> int:
        """Bytes of the device: candidates lie in ``[0, size)``."""

    def free_space(self, window: ByteRange | None = None) -> RangeSet:
        """Free ranges in ``window`` (default: the whole device), from GETFSMAP, device
        bytes. A snapshot of the in-memory allocator: not a proof of anything."""

    def file_extents(self, path: Path) -> FileExtents | None:
        """FIEMAP of the regular file ``path`` (flushed first), or ``None`` if it is gone,
        is not a regular file or lies on another filesystem."""

    def walk(self) -> Iterator[Path]:
        """Every regular file of the filesystem, not crossing into other mounts."""


@dataclass(frozen=True)
class CaptureCapabilities:
    """What a capture driver needs from the agent's event sources."""

    #: The driver uses the paths and inode numbers of events (resolving them costs
    #: time: a driver that only needs a trigger leaves this False).
    needs_paths: bool = False
    #: The driver learns from ``WRITTEN`` events as they happen (before a later delete
    #: makes the file's extents unreadable), not only at the next pass.
    eager_writes: bool = False


class CaptureOptions(DriverOptions):
    """Options every capture driver has; drivers subclass it to add their own."""

    #: ``auto``: fanotify with a filesystem mark when the kernel and privileges allow,
    #: else inotify over the tree; ``none``: only the periodic scan.
    events: Literal["auto", "fanotify", "inotify", "none"] = "auto"
    #: A pass runs once no event has arrived for this long ...
    debounce_seconds: float = Field(default=0.5, gt=0, le=60)
    #: ... or this long after the first event of a burst, whichever is first.
    max_delay_seconds: float = Field(default=5.0, gt=0, le=3600)
    #: The backstop: a pass this often even without events (0: never).
    scan_seconds: float = Field(default=300.0, ge=0)


class Capture(Driver):
    """Base class of capture drivers: one instance per watched filesystem."""

    kind = "captures"
    Options: ClassVar[type[DriverOptions]] = CaptureOptions
    capabilities: ClassVar[CaptureCapabilities] = CaptureCapabilities()
    options: CaptureOptions

    @abstractmethod
    def begin(self, target: CaptureTarget, reported: RangeSet) -> None:
        """Start watching ``target``.

        :param reported: The free ranges (device bytes) the agent has just reported or
            chose to leave unreported at start (``report_existing_free_space``): the
            driver's baseline. Called once, before any other method.
        """

    @abstractmethod
    def observe(self, events: Sequence[FsEvent]) -> None:
        """Learn from a batch of events (in arrival order). Must not block for long:
        heavy work belongs in :meth:`candidates`."""

    @abstractmethod
    def candidates(self) -> RangeSet:
        """The ranges (device bytes) that may have become free since the last pass;
        the agent verifies them. An empty set skips the pass."""

    @abstractmethod
    def settle(self, window: ByteRange, free: RangeSet) -> None:
        """After a pass: ``free`` is every free range (device bytes) inside ``window``
        (the bounds of the candidates), verified and committed; whatever of the
        candidates is in it has been reported (or vetoed by a hook)."""


__all__ = [
    "Capture",
    "CaptureCapabilities",
    "CaptureOptions",
    "CaptureTarget",
    "FileExtents",
    "FsEvent",
    "FsEventKind",
]
