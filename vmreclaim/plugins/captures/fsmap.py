"""Capture ``fsmap`` (the default): deletion events are triggers, free space is the truth.

Events carry names, never block addresses, and once a file is gone its extents cannot
^be read (docs/agent.md, "Capture"). So this driver does not try to know *which* blocks a delete
freed: it remembers the free space of the filesystem as of the last pass, and each pass
proposes everything that was not free then. Verify intersects that with the free space
now, so what is reported is exactly the blocks that became free since the last pass —
whatever freed them: unlink, ``rm -rf``, truncate, a shorter overwrite, a rename over a
file, an XFS background inactivation, or an open file's last close.

A block allocated and freed again between two passes would not be seen (a file written,
flushed and deleted within one debounce delay). So the driver takes write events as they
come (``eager_writes``): each batch of them shrinks the baseline to what GETFSMAP says is
free right then, a cheap look without syncfs that makes freshly allocated blocks
candidates again. Freed but not yet committed blocks are not free to GETFSMAP either
(ext4 frees them in its allocator only at the journal commit, XFS in background
inactivation), which covers the milliseconds between a close and the agent's look. A
block may then be reported twice; the host treats that as the no-op it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmreclaim.core.captures import (
    Capture,
    CaptureCapabilities,
    CaptureOptions,
    CaptureTarget,
    FsEvent,
    FsEventKind,
)
from vmreclaim.core.ranges import ByteRange, RangeSet


class FsmapCapture(Capture):
    """Candidates = the device minus what was free at the last pass."""

    Options = CaptureOptions
    capabilities = CaptureCapabilities(needs_paths=False, eager_writes=True)

    def begin(self, target: CaptureTarget, reported: RangeSet) -> None:
        self.target = target
        self.known_free = reported

    def observe(self, events: Sequence[FsEvent]) -> None:
        """After writes, forget as "known free" whatever is allocated now."""
        if any(e.kind is FsEventKind.WRITTEN for e in events):
            self.known_free = self.known_free.intersect(self.target.free_space())

    def candidates(self) -> RangeSet:
        return self.known_free.complement(ByteRange(0, self.target.size))

    def settle(self, window: ByteRange, free: RangeSet) -> None:
        outside = self.known_free.subtract(RangeSet.from_ranges([window]))
        self.known_free = outside.union(free)
