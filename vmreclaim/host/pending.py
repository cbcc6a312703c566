"""A disk's pending ranges in memory: the union of its stored records, merged lazily.

Records arrive by the thousand per second and a disk may have millions of pending
ranges, so coalescing the whole set on every record would cost O(n) per record.
Fresh records are kept aside and merged once they outnumber the merged set (amortised
O(log n) per range); :attr:`PendingRanges.bytes_upper` is therefore an upper bound
(overlapping records count twice until merged), exact after :meth:`PendingRanges.exact`.

A reclaim takes a :meth:`~PendingRanges.snapshot` (everything up to the newest record
id), and on success :meth:`~PendingRanges.consume` drops those records and keeps what
the reclaim did not try plus everything that arrived meanwhile — mirroring
:meth:`vmreclaim.host.store.DeletionStore.finish`.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass

import numpy as np

from vmreclaim.core.ranges import RangeSet

#: Fresh ranges are merged once there are more of them than this and than merged ones.
MERGE_AT = 4096


def fingerprint(ranges: RangeSet) -> bytes:
    """A digest of a (normalised) range set: equal sets, equal digests."""
    h = hashlib.blake2b(digest_size=16)
    h.update(ranges.starts.tobytes())
    h.update(ranges.ends.tobytes())
    return h.digest()


@dataclass(frozen=True)
class Snapshot:
    """What one reclaim attempt works on."""

    #: The ranges to reclaim now (at most the asked number of ranges, lowest first).
    ranges: RangeSet
    #: Every pending record with an id up to this one is covered by the snapshot.
    upto: int
    #: Pending ranges of those records that do not fit in this attempt.
    remainder: RangeSet
    #: When the oldest covered record was received (unix time).
    oldest_received: float


class PendingRanges:
    """The pending ranges of one disk; see the module docstring."""

    def __init__(self) -> None:
        self._merged = RangeSet()
        self._fresh: list[tuple[int, RangeSet]] = []
        self._fresh_ranges = 0
        self._fresh_bytes = 0
        self._records: deque[tuple[int, float]] = deque()
        self._snapshot_upto: int | None = None
        #: Fingerprints of the fresh records, so that a record resent as is is known.
        self._fresh_prints: set[bytes] = set()

    # -- adding --------------------------------------------------------------------------

    @classmethod
    def loaded(cls, ids: list[int], received: list[float], ranges: RangeSet) -> PendingRanges:
        """The pending set of a disk as stored (ids ascending), in one piece."""
        pending = cls()
        pending._records.extend(zip(ids, received, strict=True))
        pending._merged = ranges
        return pending

    def add(self, rid: int, received: float, ranges: RangeSet, total: int | None = None) -> None:
        """A record (ids increase) became durable; ``total`` is ``ranges.total`` if known."""
        self._records.append((rid, received))
        self._fresh.append((rid, ranges))
        self._fresh_prints.add(fingerprint(ranges))
        self._fresh_ranges += len(ranges)
        self._fresh_bytes += ranges.total if total is None else total
        # While a reclaim works on a snapshot, newer records stay apart so that consume()
        # can keep them; merging resumes afterwards.
        if self._snapshot_upto is None and self._fresh_ranges > max(MERGE_AT, len(self._merged)):
            self._merge()

    def _merge(self) -> None:
        if not self._fresh:
            return
        parts = [self._merged, *(r for _, r in self._fresh)]
        self._merged = RangeSet(
            np.concatenate([p.starts for p in parts]), np.concatenate([p.ends for p in parts])
        )
        self._fresh.clear()
        self._fresh_prints.clear()
        self._fresh_ranges = 0
        self._fresh_bytes = 0

    # -- reading -------------------------------------------------------------------------

    @property
    def bytes_upper(self) -> int:
        """Pending bytes, counting overlaps between unmerged records more than once."""
        return self._merged.total + self._fresh_bytes

    @property
    def ranges_upper(self) -> int:
        return len(self._merged) + self._fresh_ranges

    @property
    def records(self) -> int:
        return len(self._records)

    @property
    def oldest_received(self) -> float | None:
        return min((t for _, t in self._records), default=None)

    def __bool__(self) -> bool:
        return bool(self._records)

    def covers(self, ranges: RangeSet) -> bool:
        """Whether every byte of ``ranges`` is already pending in a durable record that
        no reclaim has taken yet: a record resent with those ranges adds nothing.

        While a reclaim works on a snapshot only the records that arrived since count:
        the snapshot's ranges may be dropped by it (not free under the fence), and a
        newer record saying they are free again must then be kept.
        """
        if fingerprint(ranges) in self._fresh_prints:
            return True
        merged = self._merged
        if self._snapshot_upto is not None or not len(merged) or not len(ranges):
            return False
        at = np.searchsorted(merged.starts, ranges.starts, side="right") - 1
        if bool((at < 0).any()):
            return False
        return bool((merged.ends[at] >= ranges.ends).all())

    def exact(self) -> RangeSet:
        """The coalesced pending ranges (merges unless a reclaim is in flight)."""
        if self._snapshot_upto is None:
            self._merge()
            return self._merged
        parts = [self._merged, *(r for _, r in self._fresh)]
        return RangeSet(np.concatenate([p.starts for p in parts]), np.concatenate([p.ends for p in parts]))

    # -- reclaiming -----------------------------------------------------------------------

    def snapshot(self, max_ranges: int) -> Snapshot | None:
        """Freeze what a reclaim will cover: every record so far, at most ``max_ranges``
        ranges of them now (the lowest offsets), the rest as remainder."""
        if not self._records or self._snapshot_upto is not None:
            return None
        self._merge()
        upto = self._records[-1][0]
        self._snapshot_upto = upto
        merged = self._merged
        if len(merged) <= max_ranges:
            chunk, remainder = merged, RangeSet()
        else:
            chunk = RangeSet(merged.starts[:max_ranges], merged.ends[:max_ranges], _normalised=True)
            remainder = RangeSet(merged.starts[max_ranges:], merged.ends[max_ranges:], _normalised=True)
        return Snapshot(chunk, upto, remainder, self._records[0][1])

    def abandon(self) -> None:
        """The reclaim changed nothing: every record stays pending."""
        self._snapshot_upto = None

    def consume(
        self, snap: Snapshot, remainder_id: int | None, remainder: RangeSet | None = None
    ) -> list[float]:
        """The reclaim handled ``snap``: drop its records, keep ``remainder`` (by default
        the snapshot's; stored as record ``remainder_id``) and what arrived meanwhile.

        Returns the receive times of the records now fully handled (for the
        delete-to-freed histogram); none while part of them waits in the remainder.
        """
        kept = snap.remainder if remainder is None else remainder
        done: list[float] = []
        while self._records and self._records[0][0] <= snap.upto:
            done.append(self._records.popleft()[1])
        newer = [(rid, r) for rid, r in self._fresh if rid > snap.upto]
        self._merged = RangeSet()
        self._fresh = []
        self._fresh_prints = set()
        self._fresh_ranges = 0
        self._fresh_bytes = 0
        self._snapshot_upto = None
        if kept and remainder_id is not None:
            oldest = min(done, default=snap.oldest_received)
            self._records.appendleft((remainder_id, oldest))
            self._merged = kept
            done = []
        for rid, r in newer:
            self._fresh.append((rid, r))
            self._fresh_prints.add(fingerprint(r))
            self._fresh_ranges += len(r)
            self._fresh_bytes += r.total
        if self._records and remainder_id is not None and kept:
            # The remainder's id is newer than the records that arrived meanwhile;
            # keep the deque ordered by id for the next snapshot's ``upto``.
            self._records = deque(sorted(self._records))
        return done
