"""Driver ``vfat``: recognises FAT12/16/32 (EFI system partitions) and lists them as skipped.

The free clusters of FAT are the zero entries of its allocation table; reading them
offline is future work (an EFI system partition is usually a few hundred MiB).
"""

from __future__ import annotations

import struct
from typing import ClassVar

from vmreclaim.core.filesystems import Detection, FilesystemCapabilities, FilesystemReader
from vmreclaim.core.volumes import Volume


class VfatReader(FilesystemReader):
    """FAT, detected from its boot sector's file-system type string and signature."""

    capabilities: ClassVar[FilesystemCapabilities] = FilesystemCapabilities(free_space=False)
    skip_reason = "vfat: the file allocation table is not read offline"

    def probe(self, volume: Volume) -> Detection | None:
        if volume.length < 512:
            return None
        boot = volume.read(0, 512, "fat boot sector")
        if boot[510:512] != b"\x55\xaa" or boot[3:11] == b"NTFS    ":
            return None
        fat32 = boot[0x52:0x5A] == b"FAT32   "
        if not fat32 and boot[0x36:0x3E] not in (b"FAT12   ", b"FAT16   ", b"FAT     "):
            return None
        bytes_per_sector, sectors_per_cluster = struct.unpack_from("<HB", boot, 0x0B)
        serial_at, label_at = (0x43, 0x47) if fat32 else (0x27, 0x2B)
        (serial,) = struct.unpack_from("<I", boot, serial_at)
        label = boot[label_at : label_at + 11].decode("ascii", "replace").strip()
        return Detection(
            "vfat",
            bytes_per_sector * sectors_per_cluster or None,
            "" if label == "NO NAME" else label,
            f"{serial >> 16:04X}-{serial & 0xFFFF:04X}",
        )
