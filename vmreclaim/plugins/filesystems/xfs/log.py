"""Is the XFS log clean? (``fs/xfs/xfs_log_recover.c`` describes the search we repeat.)

The free-space B+trees on disk are the truth only when nothing is waiting in the log
to be replayed on top of them. XFS says so by ending its log with an *unmount record*:
the last log record before the head holds exactly one operation, flagged
``XLOG_UNMOUNT_TRANS``, and ends exactly at the head.

The log is a ring of 512-byte basic blocks (BBs). Every BB the log writes starts with
the ring's *cycle number* (the log record header's first word is its magic instead, and
the cycle moves to ``h_cycle``); the head is where the cycle drops by one. We read the
cycle of every BB and demand the simple shape a quiesced log has — cycle ``C`` up to
the head and ``C - 1`` after it — refusing anything else (holes left by log writes that
were in flight when the guest stopped, stale or damaged blocks). Then the record that
ends at the head must be an unmount record, whose header (and, on v5, CRC32C over header
and payload) must check. This is stricter than the kernel, which would replay what it
can: we only need to know that there is nothing to replay.
"""

from __future__ import annotations

import struct

import numpy as np

from vmreclaim.core.errors import CorruptImageError
from vmreclaim.core.volumes import Volume
from vmreclaim.plugins.filesystems.checksums import crc32c
from vmreclaim.plugins.filesystems.xfs.sb import Superblock

BB = 512
HEADER_MAGIC = 0xFEEDBABE
_HEADER_CYCLE_SIZE = 32 * 1024
_REC_SIZE = 328  # header bytes the record CRC covers (through h_pad0)
_EXT_REC_SIZE = 260  # per extra header BB: xh_cycle and its 64 cycle words
_UNMOUNT_TRANS = 0x20
#: The unmount record is a few BBs; we never search further back than a whole
#: maximum-size record (256 KiB plus its headers) for its header.
_MAX_RECORD_BBS = (256 * 1024 + 8 * BB) // BB
_CHUNK = 16 * 1024 * 1024


def check_clean(volume: Volume, sb: Superblock, where: str) -> None:
    """Raise :class:`CorruptImageError` unless the internal log ends with an unmount record."""
    if sb.logstart == 0:
        raise CorruptImageError(
            f"{where}: xfs: the log is on an external device, so whether it is clean cannot "
            "be read from this disk"
        )
    start = sb.fsb_to_byte(sb.logstart)
    length = sb.logblocks * sb.block_size
    if length < 64 * BB or start + length > sb.dblocks * sb.block_size:
        raise CorruptImageError(f"{where}: xfs: log [{start}, {start + length}) lies outside the filesystem")
    cycles = _cycles(volume, start, length)
    n = cycles.size
    c0 = int(cycles[0])
    changes = np.flatnonzero(cycles != c0)
    head = int(changes[0]) if changes.size else n
    if head < n and np.any(cycles[head:] != c0 - 1):
        raise CorruptImageError(
            f"{where}: xfs: the log's cycle numbers are not those of a quiesced log (log writes "
            "were in flight); the log needs recovery"
        )
    head %= n

    def cycle_of(bb: int) -> int:
        return c0 if bb < (head or n) else c0 - 1

    # The record ending at the head: its header is the nearest BB behind the head that
    # starts with the magic (a data BB starts with its cycle number instead).
    for back in range(1, min(n, _MAX_RECORD_BBS) + 1):
        bb = (head - back) % n
        raw = volume.read(start + bb * BB, BB, "xfs log record header")
        if struct.unpack_from(">I", raw)[0] == HEADER_MAGIC:
            break
    else:
        raise CorruptImageError(f"{where}: xfs: no log record header before the log head")
    (_, h_cycle, version, h_len, lsn, _tail, _crc, _prev, logops) = struct.unpack_from(">IIIIQQIiI", raw)
    h_size = struct.unpack_from(">I", raw, 320)[0]
    fs_uuid = raw[304:320]
    hblks = 1
    if version & 2 and h_size > _HEADER_CYCLE_SIZE:
        hblks = -(-h_size // _HEADER_CYCLE_SIZE)
    end = (bb + hblks + -(-h_len // BB)) % n
    if version not in (1, 2) or h_cycle != cycle_of(bb) or lsn != (h_cycle << 32 | bb) or h_len % 8:
        raise CorruptImageError(f"{where}: xfs: the last log record header (BB {bb}) is invalid")
    if sb.crc and fs_uuid != sb.uuid:
        raise CorruptImageError(f"{where}: xfs: the last log record belongs to another filesystem")
    if end != head or logops != 1 or h_len < 16:
        raise CorruptImageError(
            f"{where}: xfs: the log does not end with an unmount record; it needs recovery "
            "(mount and unmount the filesystem, or run xfs_repair)"
        )
    body = volume.read(start + ((bb + hblks) % n) * BB, BB, "xfs unmount record")
    if not body[9] & _UNMOUNT_TRANS:
        raise CorruptImageError(
            f"{where}: xfs: the log does not end with an unmount record; it needs recovery "
            "(mount and unmount the filesystem, or run xfs_repair)"
        )
    if sb.crc:
        _check_record_crc(volume, start, n, bb, hblks, h_len, where)


def _cycles(volume: Volume, start: int, length: int) -> np.ndarray:
    """The first word (cycle number or header magic) of every BB of the log; a header
    BB's cycle is its ``h_cycle`` (the word after the magic)."""
    parts = []
    for off in range(0, length, _CHUNK):
        raw = volume.read(start + off, min(_CHUNK, length - off), "xfs log")
        words = np.frombuffer(raw, dtype=">u4").reshape(-1, BB // 4)
        first = words[:, 0].astype(np.int64)
        headers = first == HEADER_MAGIC
        first[headers] = words[headers, 1]
        parts.append(first)
    return np.concatenate(parts)


def _check_record_crc(
    volume: Volume, start: int, n: int, bb: int, hblks: int, h_len: int, where: str
) -> None:
    def at(i: int, size: int) -> bytes:
        out = b""
        pos = (bb + i) % n
        while len(out) < size:
            take = min(size - len(out), (n - pos) * BB)
            out += volume.read(start + pos * BB, take, "xfs log record")
            pos = 0
        return out

    header = at(0, hblks * BB)
    (stored,) = struct.unpack_from("<I", header, 32)
    if stored == 0:
        return  # mkfs.xfs writes its unmount record without a CRC; the kernel accepts that too
    data = header[:32] + b"\0\0\0\0" + header[36:_REC_SIZE]
    for i in range(1, hblks):
        data += header[i * BB : i * BB + _EXT_REC_SIZE]
    data += at(hblks, h_len)
    if crc32c(0xFFFFFFFF, data) ^ 0xFFFFFFFF != stored:
        raise CorruptImageError(f"{where}: xfs: the unmount record (log BB {bb}) fails its CRC32C")
