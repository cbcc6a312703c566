"""Opening a served disk's image, with ``format: auto`` pinned at first detection.

The sessions (virtual sizes at ``hello``), the reclaimer (every attempt opens the image
afresh) and the status document (the format shown) all go through one
:class:`ImageOpener`, so a guest cannot change how its image is read by writing a
header into it after the first detection: until the daemon restarts, the detected
format is the one used.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vmreclaim.core.driver import AUTO
from vmreclaim.core.formats import Image
from vmreclaim.core.model import Disk
from vmreclaim.core.opening import open_image
from vmreclaim.host.formats import FormatLedger
from vmreclaim.host.logs import event


class ImageOpener:
    """Opens disks' images; remembers the format detected for each ``auto`` disk.

    With a :class:`~vmreclaim.host.formats.FormatLedger`, the format an image was first
    served with is also kept across restarts, and a disk whose named format changes is
    refused until the operator confirms it.
    """

    def __init__(self, ledger: FormatLedger | None = None) -> None:
        self._pinned: dict[Path, str] = {}
        self._ledger = ledger

    def use_ledger(self, ledger: FormatLedger) -> None:
        """Keep formats across restarts in ``ledger`` from now on (set at daemon start)."""
        self._ledger = ledger

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def format_of(self, disk: Disk) -> str:
        """The format ``disk`` is read as: configured, pinned, or ``auto`` (not yet opened)."""
        if disk.format != AUTO:
            return disk.format
        remembered = self._ledger.known(disk.path) if self._ledger is not None else None
        return self._pinned.get(disk.path, remembered or AUTO)

    def open(self, disk: Disk) -> Image:
        """Open ``disk``'s image afresh (nothing cached survives from an earlier open)."""
        fmt = self.format_of(disk)
        if self._ledger is not None and fmt != AUTO:
            self._ledger.check(disk.path, disk.key, fmt, "the hypervisor's description of the disk")
        image = open_image(disk.path, fmt)
        if fmt == AUTO:
            if self._ledger is not None:
                try:
                    self._ledger.check(disk.path, disk.key, image.format_name, "format detection")
                except BaseException:
                    image.close()
                    raise
            self._pinned[disk.path] = image.format_name
            event(
                logging.WARNING,
                "image.format_detected",
                disk=disk.key,
                path=str(disk.path),
                format=image.format_name,
                advice="set the disk's format in the configuration; it is pinned until restart",
            )
        return image
