"""Driver ``swap``: recognises Linux swap areas so ``image sparsify`` lists them as skipped.

Swap pages are not files and have no free map on disk. After a clean shutdown their
content is garbage, but an image taken from a hibernated guest (``S1SUSPEND`` and
friends in place of the swap signature), or from a VM whose memory was saved by the
hypervisor, still needs them: punching swap offline would be unsafe without knowing
which, so it is never done.
"""

from __future__ import annotations

import uuid
from typing import ClassVar

from vmreclaim.core.filesystems import Detection, FilesystemCapabilities, FilesystemReader
from vmreclaim.core.volumes import Volume

#: Page sizes of the guest architectures we expect (x86, arm64 with 4/16/64 KiB pages).
PAGE_SIZES = (4096, 8192, 16384, 65536)
SWAP_MAGICS = (b"SWAPSPACE2", b"SWAP-SPACE")
HIBERNATION_MAGICS = (b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001")


class SwapReader(FilesystemReader):
    """A Linux swap area (signature in the last 10 bytes of the first page)."""

    capabilities: ClassVar[FilesystemCapabilities] = FilesystemCapabilities(free_space=False)
    skip_reason = "swap: its pages are not files, and a hibernated or saved guest may still need them"

    def probe(self, volume: Volume) -> Detection | None:
        for page in PAGE_SIZES:
            if volume.length < page:
                break
            magic = volume.read(page - 10, 10, "swap signature")
            if magic in SWAP_MAGICS:
                header = volume.read(1024, 48, "swap header")
                label = header[28:44].split(b"\0", 1)[0].decode("utf-8", "replace")
                return Detection("swap", page, label, str(uuid.UUID(bytes=header[12:28])))
            if any(magic.startswith(m) for m in HIBERNATION_MAGICS):
                return Detection(
                    "swap",
                    page,
                    skip_reason="swap holding a hibernation image: the guest will resume from it",
                )
        return None
