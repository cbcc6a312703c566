"""Reconciliation, the agent's half: the whole free space of one virtual disk.

Captures see deletions as they happen, but a file whose blocks are allocated at
writeback (delayed allocation) and freed before the next look was free at both looks and
is never "newly free" (issue 13). Reconciliation closes that gap by construction: on the
host's request the agent reports *every* free range of the disk, and the host keeps what
its image still holds.

The free space is found exactly as records are (DESIGN.md section 4, rule 1): the stage 2
:func:`~vmreclaim.agent.filesystems.verify` over the whole device of each watched
filesystem on the disk (statfs, syncfs, GETFSMAP, syncfs, verify hooks), then translated
from device bytes to virtual-disk bytes through partitions and dm-linear with the same
:class:`~vmreclaim.agent.devices.DiskMap`. Filesystems without GETFSMAP or without a disk
map contribute nothing: the host only learns of space the agent can vouch for.

This runs in a worker thread: GETFSMAP over a fragmented 1 TiB filesystem takes seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vmreclaim.agent import linux
from vmreclaim.agent.watched import WatchedFs, verify
from vmreclaim.core import freespace
from vmreclaim.core.freespace import FreeSpace, Reconcile
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.ranges import ByteRange, RangeSet

log = logging.getLogger("vmreclaim.agent")


@dataclass(frozen=True)
class DiskFreeSpace:
    """The free space of one disk, encoded for the wire."""

    disk: str
    encoded: freespace.Encoded
    #: Mount points that contributed, and those skipped with the reason.
    mounts: list[str]
    skipped: list[str]
    seconds: float


def free_space_of(fss: list[WatchedFs], pipeline: Pipeline, *, frozen: bool = False) -> RangeSet:
    """Every verified free byte of the filesystems ``fss`` (one disk), in disk bytes.

    ``frozen``: the filesystems are under a fence, so already committed (a syncfs on a
    frozen filesystem would block until the thaw).
    """
    out = RangeSet()
    for fs in fss:
        if fs.mode != "getfsmap" or fs.diskmap is None or fs.size <= 0:
            continue
        whole = RangeSet([0], [fs.size])
        found = verify(fs, whole, pipeline, frozen=frozen, batch=linux.FSMAP_WHOLE_BATCH).found
        out = out.union(fs.diskmap.to_disk(found.clip(ByteRange(0, fs.size))))
    return out


def reconcile_disk(
    disk: str, fss: list[WatchedFs], pipeline: Pipeline, *, frozen: bool = False
) -> DiskFreeSpace:
    """The encoded whole free space of ``disk`` (see the module docstring)."""
    started = time.monotonic()
    mounts = []
    skipped = []
    for fs in fss:
        if fs.mode != "getfsmap" or fs.diskmap is None:
            skipped.append(f"{fs.mount}: {fs.problem or 'no disk map'}")
        else:
            mounts.append(str(fs.mount))
    free = free_space_of(fss, pipeline, frozen=frozen)
    encoded = freespace.encode(free)
    return DiskFreeSpace(disk, encoded, mounts, skipped, time.monotonic() - started)


def answer(request: Reconcile, fss: list[WatchedFs] | None, pipeline: Pipeline) -> list[FreeSpace]:
    """The ``free_space`` messages that answer ``request`` (run it in a worker thread).

    ``fss`` are the filesystems the agent watches on the asked disk (``None``: it
    watches none there). Failures are answered, never raised: the host waits.
    """
    if not fss:
        return [FreeSpace(id=request.id, disk=request.disk, chunk=0, chunks=0, error="disk not watched")]
    try:
        report = reconcile_disk(request.disk, fss, pipeline)
    except OSError as exc:
        log.warning("reconciliation %d of %s failed: %s", request.id, request.disk, exc)
        error = f"listing free space failed: {exc}"[:1024]
        return [FreeSpace(id=request.id, disk=request.disk, chunk=0, chunks=0, error=error)]
    enc = report.encoded
    log.info(
        "reconciliation %d of %s: %d free ranges, %d bytes, %d chunks, %.2fs%s%s",
        request.id,
        request.disk,
        enc.total_ranges,
        enc.total_bytes,
        len(enc.chunks),
        report.seconds,
        f"; {enc.dropped} smallest ranges left out (cap)" if enc.partial else "",
        f"; skipped {', '.join(report.skipped)}" if report.skipped else "",
    )
    return freespace.messages(request, enc)
