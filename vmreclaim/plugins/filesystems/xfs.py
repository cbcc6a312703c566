"""Driver ``xfs``: recognises XFS so ``image sparsify`` can list it as skipped.

XFS keeps free space in two B+trees per allocation group (by block and by size), not in
a bitmap; reading them offline is future work. Live, the guest agent reclaims XFS
(FITRIM / GETFSMAP work on it).
"""

from __future__ import annotations

import struct
import uuid
from typing import ClassVar

from vmreclaim.core.filesystems import Detection, FilesystemCapabilities, FilesystemReader
from vmreclaim.core.volumes import Volume


class XfsReader(FilesystemReader):
    """XFS, detected from the primary superblock at byte 0 (magic ``XFSB``)."""

    capabilities: ClassVar[FilesystemCapabilities] = FilesystemCapabilities(free_space=False)
    skip_reason = (
        "xfs: free space lives in per-allocation-group B+trees, which are not read offline; "
        "reclaim it live with the guest agent"
    )

    def probe(self, volume: Volume) -> Detection | None:
        if volume.length < 512:
            return None
        sb = volume.read(0, 512, "xfs superblock")
        if sb[:4] != b"XFSB":
            return None
        (block_size,) = struct.unpack_from(">I", sb, 4)
        label = sb[108:120].split(b"\0", 1)[0].decode("utf-8", "replace")
        return Detection("xfs", block_size or None, label, str(uuid.UUID(bytes=sb[32:48])))
