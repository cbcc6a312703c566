"""Test helpers for vmreclaim and for authors of vmreclaim plugins.

Installed as a pytest plugin (entry point ``pytest11: vmreclaim``): its fixtures are
available in any test suite that has vmreclaim installed. Everything here drives real
components — files, ``qemu-img``/``qemu-io``, loop devices — never mocks of them.
"""

from vmreclaim.testing.contracts import (
    CaptureContract,
    FilesystemContract,
    FormatContract,
    HypervisorContract,
    PolicyContract,
    TransportContract,
)
from vmreclaim.testing.helpers import (
    have_tool,
    is_root,
    make_disk,
    make_raw_image,
    make_record,
    qemu_io_holding,
    require_root,
    require_tool,
    run,
)

__all__ = [
    "CaptureContract",
    "FilesystemContract",
    "FormatContract",
    "HypervisorContract",
    "PolicyContract",
    "TransportContract",
    "have_tool",
    "is_root",
    "make_disk",
    "make_raw_image",
    "make_record",
    "qemu_io_holding",
    "require_root",
    "require_tool",
    "run",
]
