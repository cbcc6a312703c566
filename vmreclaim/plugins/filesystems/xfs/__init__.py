"""Driver ``xfs``: free space of XFS v4 and v5 from each allocation group's B+trees.

XFS splits its data device into allocation groups (AGs); each keeps its free extents in
two B+trees (by block and by size) plus a short free list (:mod:`.btree`). This driver
reads them offline, after establishing that they are the truth:

* the primary superblock is valid and, on v5, passes its CRC (:mod:`.sb`);
* the internal log ends with an unmount record — nothing to replay (:mod:`.log`); a log
  on an external device cannot be checked from this disk and is refused;
* every AG's trees agree with each other and with its AGF, and the sum over all AGs of
  free blocks, free-list blocks and tree blocks equals the superblock's ``fdblocks``
  (on a cleanly unmounted filesystem the kernel writes exact counters, lazy or not).

Any failed check raises (exit 4) naming the AG and structure; nothing is punched.

Why not a library: no maintained Python package reads XFS free-space trees (``dissect.xfs``
reads files, verifies no CRCs and is AGPL-3.0); ``xfs_db`` is the oracle of the tests,
not a dependency of the host (it is not installed everywhere and its text output is not
an interface).
"""

from __future__ import annotations

import struct
from typing import ClassVar

import numpy as np

from vmreclaim.core.errors import CorruptImageError
from vmreclaim.core.filesystems import (
    Detection,
    FilesystemCapabilities,
    FilesystemReader,
    FreeSpace,
    ProgressCallback,
)
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.volumes import Volume
from vmreclaim.plugins.filesystems.xfs import log, sb
from vmreclaim.plugins.filesystems.xfs.btree import AgReader


class XfsReader(FilesystemReader):
    """XFS, detected from the primary superblock at byte 0 (magic ``XFSB``)."""

    capabilities: ClassVar[FilesystemCapabilities] = FilesystemCapabilities(free_space=True)

    def probe(self, volume: Volume) -> Detection | None:
        if volume.length < 512:
            return None
        raw = volume.read(0, 512, "xfs superblock")
        if raw[:4] != sb.MAGIC:
            return None
        (block_size,) = struct.unpack_from(">I", raw, 4)
        label = raw[108:120].split(b"\0", 1)[0].decode("utf-8", "replace")
        return Detection("xfs", block_size or None, label, sb.uuid_text(raw[32:48]))

    def free_space(
        self,
        volume: Volume,
        detection: Detection,
        progress: ProgressCallback | None = None,
        *,
        estimate: bool = False,  # read as in a real run: nothing stale is relaxed here
    ) -> FreeSpace:
        where = f"{volume.image.file.path}: {volume.label}"
        (sectsize,) = struct.unpack_from(">H", volume.read(0, 512, "xfs superblock"), 102)
        raw = volume.read(0, max(512, min(sectsize, 32768)), "xfs superblock")
        geo = sb.parse(raw, where)
        size = geo.dblocks * geo.block_size
        if size > volume.length:
            raise CorruptImageError(f"{where}: xfs spans {size} bytes but the volume holds {volume.length}")
        log.check_clean(volume, geo, where)
        starts: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        counted = 0
        for agno in range(geo.agcount):
            ag = AgReader(volume, geo, agno, where).read()
            base = agno * geo.agblocks
            starts.append(ag.starts + base)
            lengths.append(ag.lengths)
            if geo.crc:
                # Free-list blocks are free too, but only v5 protects the AGF's window into
                # the list with a CRC: a v4 slot outside a damaged window may name a block
                # that has since been reused, so v4 free lists are left alone (a few blocks).
                starts.append(ag.agfl + base)
                lengths.append(np.ones_like(ag.agfl))
            counted += ag.freeblks + ag.flcount + ag.btreeblks
            if progress is not None:
                progress(agno + 1, geo.agcount)
        if counted != geo.fdblocks:
            raise CorruptImageError(
                f"{where}: xfs: the AGs count {counted} free blocks, the superblock {geo.fdblocks}"
            )
        s = np.concatenate(starts) * geo.block_size
        e = s + np.concatenate(lengths) * geo.block_size
        return FreeSpace(RangeSet(s, e), geo.block_size, size)
