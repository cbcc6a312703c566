"""Punching holes in host files: the one place vmreclaim frees storage.

``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`` deallocates whole blocks of the
host filesystem and zeroes partial ones in place; the file keeps its size. Callers give
ranges already aligned to :func:`host_block_size` (see :meth:`RangeSet.align_inward`),
so no byte outside an asked range is ever zeroed. Python has no ``os.fallocate``, hence
ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from vmreclaim.core.errors import PunchUnsupportedError, VMReclaimError
from vmreclaim.core.lease import Lease
from vmreclaim.core.ranges import ByteRange, RangeSet

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# The C library the interpreter already links (ctypes.util.find_library would run
# ldconfig in a subprocess, a noticeable share of a short command's run time).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def host_block_size(fd: int) -> int:
    """The allocation block of the filesystem holding ``fd``: the punch granularity."""
    return os.fstatvfs(fd).f_bsize


def allocated_bytes(file: int | str | os.PathLike[str]) -> int:
    """Bytes the host filesystem has allocated for a file (open as ``file``, or at that path).

    ``st_blocks`` counts 512-byte units whatever the filesystem's block size (stat(2)).
    """
    return os.stat(file).st_blocks * 512


def allocated_ranges(fd: int, window: ByteRange | None = None) -> RangeSet:
    """Byte ranges of the open file the host filesystem has allocated, inside ``window``
    (default: the whole file), from ``SEEK_DATA``/``SEEK_HOLE``: what a punch can free."""
    if window is None:
        window = ByteRange(0, os.fstat(fd).st_size)
    starts: list[int] = []
    ends: list[int] = []
    pos = window.start
    while pos < window.end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if data >= window.end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        starts.append(data)
        ends.append(min(hole, window.end))
        pos = hole
    return RangeSet(starts, ends)


_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEADER = struct.Struct("=QQLLLL")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQLLLL")  # logical, physical, length, 2 reserved, flags, 3 reserved
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_BATCH = 512


def held_ranges(fd: int, window: ByteRange | None = None) -> RangeSet:
    """Byte ranges of the open file that hold storage, inside ``window``: every extent
    FIEMAP reports, *unwritten ones included*.

    ``SEEK_DATA`` (:func:`allocated_ranges`) calls an unwritten extent a hole, yet it
    holds blocks — QEMU's qcow2 allocates clusters with ``fallocate(ZERO_RANGE)`` — and a
    punch frees them; counting "what a punch frees" needs this walk. Where FIEMAP is not
    supported (a block device, tmpfs) every byte of ``window`` counts as held, which
    only ever overstates what is punched, never drops a range that would free storage.
    """
    size = os.fstat(fd).st_size
    if window is None:
        window = ByteRange(0, size)
    starts: list[int] = []
    ends: list[int] = []
    pos = window.start
    # No FIEMAP_FLAG_SYNC: it would flush a live image's dirty pages inside the fence,
    # and ext4 reports delayed-allocation extents without it anyway.
    flags = 0
    while pos < window.end:
        buf = bytearray(
            _FIEMAP_HEADER.pack(pos, window.end - pos, flags, 0, _FIEMAP_BATCH, 0)
            + bytes(_FIEMAP_EXTENT.size * _FIEMAP_BATCH)
        )
        try:
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                return RangeSet([window.start], [window.end]) if window.length else RangeSet()
            raise
        mapped = _FIEMAP_HEADER.unpack_from(buf)[3]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            ext = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP_HEADER.size + i * _FIEMAP_EXTENT.size)
            logical, length, ext_flags = ext[0], ext[2], ext[5]
            lo, hi = max(logical, window.start), min(logical + length, window.end)
            if lo < hi:
                starts.append(lo)
                ends.append(hi)
            pos = max(pos, logical + length)
            last = last or bool(ext_flags & _FIEMAP_EXTENT_LAST)
        if last:
            break
    return RangeSet(starts, ends)


@dataclass(frozen=True)
class PunchResult:
    """What a punch did: bytes asked to be punched and allocated bytes actually freed."""

    punched_bytes: int
    freed_bytes: int


def punch_holes(fd: int, ranges: RangeSet, *, path: str = "", lease: Lease | None = None) -> PunchResult:
    """Punch every range of ``ranges`` (already aligned and coalesced) in one call each.

    ``freed_bytes`` is measured: allocated bytes before minus after, so it also shows
    ranges that were already holes (freeing nothing) and concurrent writers. With a
    ``lease`` (a live punch inside a fence) the lease is checked before every call and
    :class:`~vmreclaim.core.errors.FenceError` stops the punch once it is over.
    """
    before = allocated_bytes(fd)
    for start, end in zip(ranges.starts.tolist(), ranges.ends.tolist(), strict=True):
        if lease is not None:
            lease.check()
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start):
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise PunchUnsupportedError(
                    f"{path or fd}: the host filesystem cannot punch holes "
                    f"(fallocate PUNCH_HOLE: {os.strerror(err)})"
                )
            raise VMReclaimError(f"{path or fd}: punching [{start}, {end}) failed: {os.strerror(err)}")
    return PunchResult(punched_bytes=ranges.total, freed_bytes=before - allocated_bytes(fd))
