"""Driver ``btrfs``: recognises btrfs so ``image sparsify`` can list it as skipped.

btrfs is copy-on-write: free space is what its extent tree does not reference, across
possibly several devices, with chunks mapping logical to physical bytes. Reading that
offline is future work; live, the guest agent reclaims btrfs through FITRIM.
"""

from __future__ import annotations

import struct
import uuid
from typing import ClassVar

from vmreclaim.core.filesystems import Detection, FilesystemCapabilities, FilesystemReader
from vmreclaim.core.volumes import Volume

#: The primary superblock is 64 KiB into the device.
SUPERBLOCK_OFFSET = 0x10000


class BtrfsReader(FilesystemReader):
    """btrfs, detected from the primary superblock (magic ``_BHRfS_M``)."""

    capabilities: ClassVar[FilesystemCapabilities] = FilesystemCapabilities(free_space=False)
    skip_reason = (
        "btrfs: copy-on-write extent trees (possibly spanning several devices) are not read "
        "offline; reclaim it live with the guest agent"
    )

    def probe(self, volume: Volume) -> Detection | None:
        if volume.length < SUPERBLOCK_OFFSET + 4096:
            return None
        sb = volume.read(SUPERBLOCK_OFFSET, 4096, "btrfs superblock")
        if sb[0x40:0x48] != b"_BHRfS_M":
            return None
        (sector_size,) = struct.unpack_from("<I", sb, 0x90)
        label = sb[0x12B:0x22B].split(b"\0", 1)[0].decode("utf-8", "replace")
        return Detection("btrfs", sector_size or None, label, str(uuid.UUID(bytes=sb[0x20:0x30])))
