"""The raw format: guest byte ``g`` is host byte ``g``; holes read as zeros.

Holes of a sparse raw file are found with ``SEEK_DATA``/``SEEK_HOLE`` and mapped as
``zero`` (nothing to free there); every allocated byte is ``data``. A raw file has no
metadata of its own, so nothing in it is protected from punching but what the map says.
"""

from __future__ import annotations

import numpy as np

from vmreclaim.core.extents import NO_OFFSET, ExtentKind, ExtentMap
from vmreclaim.core.formats import Image, ImageFile, ImageFormat, ImageOpener
from vmreclaim.core.punch import allocated_ranges, host_block_size
from vmreclaim.core.ranges import ByteRange, RangeSet


class RawImage(Image):
    """A raw image file or block device."""

    @property
    def virtual_size(self) -> int:
        return self.file.size

    @property
    def cluster_size(self) -> int:
        # A raw file's allocation unit is the host filesystem's block.
        return host_block_size(self.file.fd)

    def metadata_ranges(self) -> RangeSet:
        return RangeSet()

    def map(self, window: ByteRange) -> ExtentMap:
        data = self._data_ranges(window)
        holes = data.complement(window)
        starts = np.concatenate([data.starts, holes.starts])
        ends = np.concatenate([data.ends, holes.ends])
        kinds = np.concatenate(
            [np.full(len(data), ExtentKind.DATA), np.full(len(holes), ExtentKind.ZERO)]
        ).astype(np.uint8)
        offsets = np.concatenate([data.starts, np.full(len(holes), NO_OFFSET)])
        order = np.argsort(starts, kind="stable")
        result = ExtentMap(starts[order], (ends - starts)[order], kinds[order], offsets[order])
        result.require_covers(window, f"{self.file.path}: raw map")
        return result

    def _data_ranges(self, window: ByteRange) -> RangeSet:
        """Allocated ranges of the file inside ``window`` (a block device: all of it)."""
        if self.file.is_block_device:
            return RangeSet([window.start], [window.end])
        return allocated_ranges(self.file.fd, window)


class RawFormat(ImageFormat):
    """Driver ``raw``: the catch-all format, chosen when nothing else recognises a file."""

    def probe(self, file: ImageFile) -> int:
        return 1

    def open(self, file: ImageFile, opener: ImageOpener) -> Image:
        return RawImage(file, "raw")
