"""Driver ``ntfs``: recognises NTFS so ``image sparsify`` can list it as skipped.

NTFS records free clusters in the ``$Bitmap`` metafile, reached through the MFT; reading
it offline is future work.
"""

from __future__ import annotations

import struct
from typing import ClassVar

from vmreclaim.core.filesystems import Detection, FilesystemCapabilities, FilesystemReader
from vmreclaim.core.volumes import Volume


class NtfsReader(FilesystemReader):
    """NTFS, detected from its boot sector (OEM id ``NTFS    ``)."""

    capabilities: ClassVar[FilesystemCapabilities] = FilesystemCapabilities(free_space=False)
    skip_reason = "ntfs: the $Bitmap metafile (reached through the MFT) is not read offline"

    def probe(self, volume: Volume) -> Detection | None:
        if volume.length < 512:
            return None
        boot = volume.read(0, 512, "ntfs boot sector")
        if boot[3:11] != b"NTFS    ":
            return None
        bytes_per_sector, spc = struct.unpack_from("<HB", boot, 0x0B)
        # Sectors per cluster above 0x80 encode a power of two: 2 ** (256 - value).
        sectors = 1 << (256 - spc) if spc > 0x80 else spc
        (serial,) = struct.unpack_from("<Q", boot, 0x48)
        return Detection("ntfs", bytes_per_sector * sectors or None, uuid=f"{serial:016X}")
