"""Capture ``fiemap``: the source design's own way — remember each file's extents.

The patent's info collector reads a file's block addresses while its inode is still
valid. A guest cannot intercept unlink from user space, so this driver learns extents
ahead of time: it walks the filesystem at start and, on every write-and-close (and at
the next pass after a modification or truncate), reads the file's extents with
FS_IOC_FIEMAP (flushed first, so delayed allocations have real addresses). When a file
is deleted (by inode number when fanotify reports it, else by path), or shrinks, or a
rescan finds it gone, the extents it lost become candidates, which verify then checks
against GETFSMAP like any others.

Candidates that are not free yet (a deleted file still open somewhere; blocks already
reused) wait for later passes, up to ``pending_seconds``. Shared (reflinked) extents are
never candidates. The index costs memory per file (``max_files`` bounds it; files past
the bound are left to the ``fsmap`` way of the periodic scan: none) and a FIEMAP per
written file, which is why ``fsmap`` is the default.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from vmreclaim.core.captures import (
    Capture,
    CaptureCapabilities,
    CaptureOptions,
    CaptureTarget,
    FsEvent,
    FsEventKind,
)
from vmreclaim.core.ranges import ByteRange, RangeSet

log = logging.getLogger("vmreclaim.agent.fiemap")


class FiemapOptions(CaptureOptions):
    #: How long the extents of a deleted file wait to become free before being forgotten.
    pending_seconds: float = Field(default=600.0, gt=0)
    #: Files whose extents are remembered at most.
    max_files: int = Field(default=1_000_000, ge=1)


class FiemapCapture(Capture):
    """Candidates = the extents of files deleted or shrunk since the last pass."""

    Options = FiemapOptions
    options: FiemapOptions
    capabilities = CaptureCapabilities(needs_paths=True, eager_writes=True)

    def begin(self, target: CaptureTarget, reported: RangeSet) -> None:
        self.target = target
        self.extents: dict[int, RangeSet] = {}
        self.paths: dict[Path, int] = {}
        #: (time the extents were lost, ranges still waiting to be found free)
        self.pending: deque[tuple[float, RangeSet]] = deque()
        #: Files modified (written, truncated) and not closed yet: looked at each pass.
        self.modified: dict[Path, None] = {}
        self.full = False
        self._rescan(initial=True)

    # -- learning -------------------------------------------------------------------------

    def observe(self, events: Sequence[FsEvent]) -> None:
        written: dict[Path, None] = {}
        for event in events:
            if event.kind is FsEventKind.WRITTEN and event.path is not None and not event.is_dir:
                written[event.path] = None
                self.modified.pop(event.path, None)
            elif event.kind is FsEventKind.MODIFIED and event.path is not None:
                self.modified[event.path] = None
            elif event.kind is FsEventKind.DELETED:
                self._deleted(event)
            elif event.kind is FsEventKind.MOVED and event.path is not None:
                self._moved(event.path)
            elif event.kind in (FsEventKind.OVERFLOW, FsEventKind.SCAN):
                self._rescan()
        for path in written:
            self._learn(path)

    def _learn(self, path: Path) -> None:
        ext = self.target.file_extents(path)
        if ext is None:
            return
        old_ino = self.paths.get(path)
        if old_ino is not None and old_ino != ext.inode:
            # The name now points to another inode: the old one was replaced.
            self._lose(self.extents.pop(old_ino, RangeSet()))
        old = self.extents.get(ext.inode)
        if old is not None:
            self._lose(old.subtract(ext.ranges))  # truncated or rewritten shorter
        elif len(self.extents) >= self.options.max_files:
            self._index_full()
            return
        self.extents[ext.inode] = ext.ranges
        self.paths[path] = ext.inode

    def _deleted(self, event: FsEvent) -> None:
        if event.is_dir:
            return  # rmdir needs an empty directory: its files had their own events
        ino = event.inode
        if event.path is not None:
            by_path = self.paths.pop(event.path, None)
            ino = ino if ino is not None else by_path
        if ino is not None:
            self._lose(self.extents.pop(ino, RangeSet()))

    def _moved(self, path: Path) -> None:
        """A rename: the name may now hold another inode (a rename over a file)."""
        old = self.paths.pop(path, None)
        self._learn(path)
        new = self.paths.get(path)
        if old is not None and old != new:
            # Another hard link may keep the old inode: verify will find it not free.
            self._lose(self.extents.pop(old, RangeSet()))

    def _rescan(self, *, initial: bool = False) -> None:
        """Walk the filesystem: learn new files, lose the extents of vanished ones."""
        seen: dict[int, RangeSet] = {}
        paths: dict[Path, int] = {}
        for path in self.target.walk():
            if len(seen) >= self.options.max_files:
                self._index_full()
                break
            ext = self.target.file_extents(path)
            if ext is None:
                continue
            seen[ext.inode] = ext.ranges
            paths[path] = ext.inode
        if not initial:
            for ino, ranges in self.extents.items():
                now = seen.get(ino)
                self._lose(ranges if now is None else ranges.subtract(now))
        self.extents, self.paths = seen, paths
        log.debug("%s: %d files indexed", self.target.mount, len(seen))

    def _index_full(self) -> None:
        if not self.full:
            log.warning(
                "%s: more than %d files; extents of the others are not remembered (max_files)",
                self.target.mount,
                self.options.max_files,
            )
            self.full = True

    def _lose(self, ranges: RangeSet) -> None:
        if ranges:
            self.pending.append((time.monotonic(), ranges))

    # -- passes -----------------------------------------------------------------------------

    def candidates(self) -> RangeSet:
        modified, self.modified = self.modified, {}
        for path in modified:
            self._learn(path)
        horizon = time.monotonic() - self.options.pending_seconds
        while self.pending and self.pending[0][0] < horizon:
            self.pending.popleft()
        out = RangeSet()
        for _, ranges in self.pending:
            out = out.union(ranges)
        return out

    def settle(self, window: ByteRange, free: RangeSet) -> None:
        kept: deque[tuple[float, RangeSet]] = deque()
        for when, ranges in self.pending:
            left = ranges.subtract(free.clip(window))
            if left:
                kept.append((when, left))
        self.pending = kept
