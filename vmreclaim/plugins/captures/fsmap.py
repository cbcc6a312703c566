"""Capture ``fsmap`` (the default): deletion events are triggers, free space is the truth.

Events carry names, never block addresses, and once a file is gone its extents cannot
be read (specs.md 5.3). So this driver does not try to know *which* blocks a delete
freed: it remembers the free space of the filesystem as of the last pass, and each pass
proposes everything that was not free then. Verify intersects that with the free space
now, so what is reported is exactly the blocks that became free since the last pass —
whatever freed them: unlink, ``rm -rf``, truncate, a shorter overwrite, a rename over a
file, an XFS background inactivation, or an open file's last close.

A block that is allocated and freed again between two passes is not seen; a pass runs
after every burst of writes as well as deletes, which keeps that window to the debounce
delay, and the periodic scan catches anything an event source missed.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmreclaim.core.captures import Capture, CaptureOptions, CaptureTarget, FsEvent
from vmreclaim.core.ranges import ByteRange, RangeSet


class FsmapCapture(Capture):
    """Candidates = the device minus what was free at the last pass."""

    Options = CaptureOptions

    def begin(self, target: CaptureTarget, reported: RangeSet) -> None:
        self.target = target
        self.known_free = reported

    def observe(self, events: Sequence[FsEvent]) -> None:
        """Nothing to learn from an event beyond "look again", which the agent does."""

    def candidates(self) -> RangeSet:
        return self.known_free.complement(ByteRange(0, self.target.size))

    def settle(self, window: ByteRange, free: RangeSet) -> None:
        outside = self.known_free.subtract(RangeSet.from_ranges([window]))
        self.known_free = outside.union(free)
