"""Driver ``luks``: recognises LUKS-encrypted volumes and lists them as skipped.

Without the key the filesystem inside is ciphertext: its free blocks cannot be found
offline. Live, the guest agent sees the opened device and can reclaim through it (when
the dm-crypt mapping allows discards).
"""

from __future__ import annotations

import struct
from typing import ClassVar

from vmreclaim.core.filesystems import Detection, FilesystemCapabilities, FilesystemReader
from vmreclaim.core.volumes import Volume


class LuksReader(FilesystemReader):
    """LUKS1 or LUKS2 (magic ``LUKS\\xba\\xbe`` at byte 0)."""

    capabilities: ClassVar[FilesystemCapabilities] = FilesystemCapabilities(free_space=False)
    skip_reason = "crypto_LUKS: encrypted; its free space is not visible without the key"

    def probe(self, volume: Volume) -> Detection | None:
        if volume.length < 512:
            return None
        head = volume.read(0, 512, "LUKS header")
        if head[:6] != b"LUKS\xba\xbe":
            return None
        (version,) = struct.unpack_from(">H", head, 6)
        uuid_text = head[168:208].split(b"\0", 1)[0].decode("ascii", "replace")
        return Detection(
            f"crypto_LUKS{version}" if version in (1, 2) else "crypto_LUKS", None, uuid=uuid_text
        )
