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

from vmreclaim.core.formats import Image
from vmreclaim.core.image import AUTO, open_image
from vmreclaim.core.model import Disk
from vmreclaim.host.logs import event


class ImageOpener:
    """Opens disks' images; remembers the format detected for each ``auto`` disk."""

    def __init__(self) -> None:
        self._pinned: dict[Path, str] = {}

    def format_of(self, disk: Disk) -> str:
        """The format ``disk`` is read as: configured, pinned, or ``auto`` (not yet opened)."""
        return disk.format if disk.format != AUTO else self._pinned.get(disk.path, AUTO)

    def open(self, disk: Disk) -> Image:
        """Open ``disk``'s image afresh (nothing cached survives from an earlier open)."""
        fmt = self.format_of(disk)
        image = open_image(disk.path, fmt)
        if fmt == AUTO:
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
