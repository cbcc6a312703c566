"""Domain types shared by the agent, the host and every plugin kind.

* :class:`VMIdentity` — who a VM is, as its hypervisor (never the guest) says;
* :class:`Disk` — one virtual disk of a VM and the image file behind it;
* :class:`DeletionRecord` — what a guest reports: byte ranges of one virtual disk that
  became free (DESIGN.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vmreclaim.core.errors import ProtocolError, RangeError
from vmreclaim.core.ranges import MAX_OFFSET, ByteRange, RangeSet

#: Version of the deletion-record shape; bumped only when a field changes meaning.
RECORD_VERSION = 1
#: A record never carries more ranges than this; larger reports are split by the agent
#: and refused by the host (bounded memory per message, DESIGN.md section 4).
MAX_RANGES_PER_RECORD = 65536


@dataclass(frozen=True)
class VMIdentity:
    """A VM as the hypervisor names it. The host derives it from the channel a message
    arrived on; it is never read from the message itself (DESIGN.md section 4, rule 5)."""

    name: str
    uuid: str | None = None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Disk:
    """One virtual disk of a VM and the image file that stores it."""

    vm: str
    id: str
    path: Path
    format: str = "auto"
    #: The hypervisor passes the guest's discards to the image (discard=unmap): the
    #: agent can use guest-trim mode instead of a host punch.
    passes_discards: bool = False
    serial: str | None = None
    target: str | None = None

    @property
    def key(self) -> str:
        """``vm/disk``, unique on a host; used in the database and in logs."""
        return f"{self.vm}/{self.id}"


@dataclass(frozen=True)
class DeletionRecord:
    """Byte ranges of one virtual disk that a guest verified free (DESIGN.md section 5).

    Offsets are on the virtual disk: the agent has already added partition starts and
    device-mapper offsets. ``bytes`` is the sum of the range lengths.
    """

    vm: str
    disk: str
    ranges: RangeSet
    fs: str = ""
    seq: int = 0
    version: int = RECORD_VERSION

    @property
    def bytes(self) -> int:
        return self.ranges.total

    def to_json(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "vm": self.vm,
            "disk": self.disk,
            "ranges": self.ranges.to_pairs(),
            "bytes": self.bytes,
            "fs": self.fs,
            "seq": self.seq,
        }

    @classmethod
    def from_json(cls, doc: Any, *, vm: str | None = None, disk_size: int | None = None) -> DeletionRecord:
        """Validate an untrusted record document.

        ``vm``, when given, replaces whatever VM the document names: the caller knows
        the VM from the channel. ``disk_size`` bounds every range. Raises
        :class:`ProtocolError` naming the first problem.
        """
        if not isinstance(doc, dict):
            raise ProtocolError("record is not a JSON object")
        version = doc.get("v", RECORD_VERSION)
        if version != RECORD_VERSION:
            raise ProtocolError(f"record version {version!r} is not {RECORD_VERSION}")
        disk = doc.get("disk")
        if not isinstance(disk, str) or not disk or len(disk) > 256:
            raise ProtocolError("record 'disk' must be a non-empty string of at most 256 characters")
        raw_ranges = doc.get("ranges")
        if not isinstance(raw_ranges, list) or not raw_ranges:
            raise ProtocolError("record 'ranges' must be a non-empty list of [offset, length]")
        if len(raw_ranges) > MAX_RANGES_PER_RECORD:
            raise ProtocolError(
                f"record has {len(raw_ranges)} ranges, more than the limit {MAX_RANGES_PER_RECORD}"
            )
        ranges = _bulk_ranges(raw_ranges, disk_size)
        if ranges is None:
            # Something is off: check range by range, to name the first problem.
            pairs = []
            for i, pair in enumerate(raw_ranges):
                if not isinstance(pair, list) or len(pair) != 2 or not all(type(v) is int for v in pair):
                    raise ProtocolError(f"record range #{i} is not [offset, length] of two integers")
                try:
                    r = ByteRange(pair[0], pair[1])
                except RangeError as exc:
                    raise ProtocolError(f"record range #{i}: {exc}") from exc
                if not r:
                    raise ProtocolError(f"record range #{i} is empty")
                if disk_size is not None and r.end > disk_size:
                    raise ProtocolError(
                        f"record range #{i} {r} lies outside disk {disk!r} of {disk_size} bytes"
                    )
                pairs.append(r)
            ranges = RangeSet.from_ranges(pairs)
        claimed = doc.get("bytes")
        if claimed is not None and (type(claimed) is not int or claimed != ranges.total):
            raise ProtocolError(
                f"record 'bytes' {claimed!r} is not the {ranges.total} bytes its ranges cover"
            )
        seq = doc.get("seq", 0)
        if type(seq) is not int or seq < 0:
            raise ProtocolError("record 'seq' must be a non-negative integer")
        fs = doc.get("fs", "")
        if not isinstance(fs, str) or len(fs) > 64:
            raise ProtocolError("record 'fs' must be a string of at most 64 characters")
        named_vm = doc.get("vm", "")
        return cls(
            vm=vm if vm is not None else str(named_vm),
            disk=disk,
            ranges=ranges,
            fs=fs,
            seq=seq,
            version=version,
        )


def _bulk_ranges(raw: list[Any], disk_size: int | None) -> RangeSet | None:
    """The ranges of a record checked in bulk (a host ingests hundreds of thousands a
    second), or ``None`` when anything is off — then the per-range check of
    :meth:`DeletionRecord.from_json` runs and names the first problem, so both paths
    accept and refuse exactly the same records."""
    if not all(type(p) is list and len(p) == 2 and type(p[0]) is int and type(p[1]) is int for p in raw):
        return None
    try:
        pairs = np.array(raw, dtype=np.int64).reshape(-1, 2)
    except OverflowError:
        return None
    starts, lengths = pairs[:, 0], pairs[:, 1]
    ends = starts + lengths  # wraps only where the overflow test below fails anyway
    bad = (starts < 0) | (lengths <= 0) | (starts > MAX_OFFSET - lengths)
    if disk_size is not None:
        bad |= ends > disk_size
    if bad.any():
        return None
    # Agents send their ranges sorted and coalesced; then there is nothing to normalise.
    ordered = len(pairs) < 2 or bool((starts[1:] > ends[:-1]).all())
    return RangeSet(starts, ends, _normalised=ordered)
