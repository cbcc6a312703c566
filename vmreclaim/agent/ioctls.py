"""ioctl request numbers the agent uses, for the asm-generic encoding.

Kept apart from :mod:`vmreclaim.agent.linux` (which needs numpy) so that the thaw
guardian process starts with nothing but the standard library.
"""

from __future__ import annotations

_IOWR = 3


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)`` of x86_64, arm64, riscv64, s390x (not PowerPC/MIPS)."""
    return (direction << 30) | (size << 16) | (kind << 8) | nr


FS_IOC_GETFSMAP = _ioc(_IOWR, ord("X"), 59, 192)  # struct fsmap_head
FITRIM = _ioc(_IOWR, ord("X"), 121, 24)  # struct fstrim_range
FIFREEZE = _ioc(_IOWR, ord("X"), 119, 4)  # int
FITHAW = _ioc(_IOWR, ord("X"), 120, 4)  # int
FS_IOC_FIEMAP = _ioc(_IOWR, ord("f"), 11, 32)  # struct fiemap
DM_TABLE_STATUS = _ioc(_IOWR, 0xFD, 12, 312)  # struct dm_ioctl
