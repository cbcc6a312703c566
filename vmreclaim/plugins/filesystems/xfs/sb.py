"""The XFS primary superblock, validated (``fs/xfs/libxfs/xfs_format.h``).

Everything else the reader does is sized by these numbers, so each is checked against
the others before use: the block and sector sizes against their logarithms, the AG
geometry against the filesystem size, the feature words against the features whose
on-disk effect on free-space accounting we know. A v5 superblock carries a CRC32C over
its sector; it is verified before any field is believed.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from vmreclaim.core.errors import CorruptImageError, UnsupportedImageError
from vmreclaim.plugins.filesystems.checksums import crc32c

MAGIC = b"XFSB"
SB_CRC_OFFSET = 224

# sb_versionnum (v4 feature bits); MOREBITS means sb_features2 is used.
_V4_DIRV2 = 0x2000
_V4_MOREBITS = 0x8000
_V2_LAZYSBCOUNT = 0x0002
_V2_OKBITS = 0x0002 | 0x0008 | 0x0010 | 0x0080 | 0x0100 | 0x0200  # lazycount attr2 parent projid32 crc ftype
# v5 feature words
_RO_COMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8  # finobt, rmapbt, reflink, inobtcount
_INCOMPAT_NEEDSREPAIR = 0x10
_INCOMPAT_META_UUID = 0x4
# ftype, spinodes, meta_uuid, bigtime, nrext64, exchrange, parent: none changes the AG
# free-space btrees; needsrepair is known in order to refuse it with its own message.
_INCOMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x80
_LOG_INCOMPAT_KNOWN = 0x1  # logged xattrs: only matters to a dirty log, which we refuse


@dataclass(frozen=True)
class Superblock:
    version: int
    block_size: int
    sector_size: int
    dblocks: int
    agblocks: int
    agcount: int
    agblklog: int
    logstart: int
    logblocks: int
    fdblocks: int
    uuid: bytes
    meta_uuid: bytes
    lazy_counts: bool
    label: str

    @property
    def crc(self) -> bool:
        return self.version == 5

    @property
    def bb_per_block(self) -> int:
        return self.block_size // 512

    def ag_length(self, agno: int) -> int:
        """Blocks in AG ``agno`` (the last one may be short)."""
        return self.agblocks if agno < self.agcount - 1 else self.dblocks - agno * self.agblocks

    def fsb_to_byte(self, fsb: int) -> int:
        """Byte offset of a filesystem block number (``agno << agblklog | agbno``)."""
        agno, agbno = fsb >> self.agblklog, fsb & ((1 << self.agblklog) - 1)
        return (agno * self.agblocks + agbno) * self.block_size


def verify_crc(block: bytes, offset: int) -> bool:
    """An XFS metadata CRC: CRC32C of the block with its CRC field zeroed, inverted, LE."""
    (stored,) = struct.unpack_from("<I", block, offset)
    zeroed = block[:offset] + b"\0\0\0\0" + block[offset + 4 :]
    return bool(crc32c(0xFFFFFFFF, zeroed) ^ 0xFFFFFFFF == stored)


def parse(raw: bytes, where: str) -> Superblock:
    """Parse and validate the primary superblock (``raw`` holds at least its sector)."""
    (magic, block_size, dblocks, _rblocks, _rextents) = struct.unpack_from(">4sIQQQ", raw, 0)
    fs_uuid = raw[32:48]
    (logstart,) = struct.unpack_from(">Q", raw, 48)
    agblocks, agcount, _rbmblocks, logblocks = struct.unpack_from(">IIII", raw, 84)
    versionnum, sectsize = struct.unpack_from(">HH", raw, 100)
    blocklog, sectlog, _inodelog, _inopblog, agblklog, _rextslog, inprogress = struct.unpack_from(
        ">7B", raw, 120
    )
    (fdblocks,) = struct.unpack_from(">Q", raw, 144)
    (features2,) = struct.unpack_from(">I", raw, 200)
    compat, ro_compat, incompat, log_incompat = struct.unpack_from(">IIII", raw, 208)
    if magic != MAGIC:
        raise CorruptImageError(f"{where}: xfs superblock has no XFSB magic")
    if sectsize not in (512, 1024, 2048, 4096, 8192, 16384, 32768) or 1 << sectlog != sectsize:
        raise CorruptImageError(f"{where}: xfs superblock: sector size {sectsize} (log {sectlog})")
    if not 512 <= block_size <= 65536 or 1 << blocklog != block_size or block_size < sectsize:
        raise CorruptImageError(f"{where}: xfs superblock: block size {block_size} (log {blocklog})")
    version = versionnum & 0xF
    if version == 5:
        if len(raw) < sectsize or not verify_crc(raw[:sectsize], SB_CRC_OFFSET):
            raise CorruptImageError(f"{where}: xfs superblock fails its CRC32C")
        if incompat & _INCOMPAT_NEEDSREPAIR:
            raise CorruptImageError(f"{where}: xfs superblock says the filesystem needs xfs_repair")
        unknown = (
            (compat, "compat"),
            (ro_compat & ~_RO_COMPAT_KNOWN, "ro_compat"),
            (incompat & ~_INCOMPAT_KNOWN, "incompat"),
            (log_incompat & ~_LOG_INCOMPAT_KNOWN, "log_incompat"),
        )
        for bits, name in unknown:
            if bits:
                raise UnsupportedImageError(f"{where}: xfs: unknown {name} features {bits:#x}")
        lazy = True
    elif version == 4:
        more = features2 if versionnum & _V4_MOREBITS else 0
        if not versionnum & _V4_DIRV2 or more & ~_V2_OKBITS:
            raise UnsupportedImageError(
                f"{where}: xfs v4 features {versionnum:#06x}/{features2:#x} are not understood"
            )
        lazy = bool(more & _V2_LAZYSBCOUNT)
    else:
        raise UnsupportedImageError(f"{where}: xfs superblock version {version} (only 4 and 5 are read)")
    if inprogress:
        raise CorruptImageError(f"{where}: xfs superblock says mkfs.xfs did not finish")
    if agcount == 0 or agblocks < 16 or agblklog > 31 or not 1 << (agblklog - 1) < agblocks <= 1 << agblklog:
        raise CorruptImageError(
            f"{where}: xfs superblock: {agcount} AGs of {agblocks} blocks (log {agblklog})"
        )
    if not (agcount - 1) * agblocks < dblocks <= agcount * agblocks:
        raise CorruptImageError(
            f"{where}: xfs superblock: {dblocks} blocks do not make {agcount} AGs of {agblocks}"
        )
    meta_uuid = raw[248:264] if version == 5 and incompat & _INCOMPAT_META_UUID else fs_uuid
    return Superblock(
        version,
        block_size,
        sectsize,
        dblocks,
        agblocks,
        agcount,
        agblklog,
        logstart,
        logblocks,
        fdblocks,
        fs_uuid,
        meta_uuid,
        lazy,
        raw[108:120].split(b"\0", 1)[0].decode("utf-8", "replace"),
    )


def uuid_text(raw: bytes) -> str:
    return str(uuid.UUID(bytes=raw))
