"""The ext2/3/4 superblock: its feature flags, its validated fields, and the refusals
that need nothing but the superblock (a journal to replay, an unclean state, unknown
features, multi-mount protection in use). Split from :mod:`.ext`, which reads the group
descriptors and bitmaps."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmreclaim.core.errors import CorruptImageError, ImageBusyError, UnsupportedImageError
from vmreclaim.core.volumes import Volume
from vmreclaim.plugins.filesystems.checksums import crc32c

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
MAGIC = 0xEF53

# s_state
STATE_VALID = 0x0001
STATE_ERROR = 0x0002
STATE_ORPHANS = 0x0004

# s_feature_compat
COMPAT_HAS_JOURNAL = 0x0004
COMPAT_EXCLUDE_BITMAP = 0x0100
COMPAT_SPARSE_SUPER2 = 0x0200

# s_feature_incompat
INCOMPAT_COMPRESSION = 0x0001
INCOMPAT_FILETYPE = 0x0002
INCOMPAT_RECOVER = 0x0004
INCOMPAT_JOURNAL_DEV = 0x0008
INCOMPAT_META_BG = 0x0010
INCOMPAT_EXTENTS = 0x0040
INCOMPAT_64BIT = 0x0080
INCOMPAT_MMP = 0x0100
INCOMPAT_FLEX_BG = 0x0200
INCOMPAT_EA_INODE = 0x0400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000
#: Incompatible features whose effect on block allocation we know: none of them changes
#: what a clear bit in a block bitmap means.
INCOMPAT_KNOWN = (
    INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_DIRDATA
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD
)

# s_feature_ro_compat
RO_SPARSE_SUPER = 0x0001
RO_LARGE_FILE = 0x0002
RO_BTREE_DIR = 0x0004
RO_HUGE_FILE = 0x0008
RO_GDT_CSUM = 0x0010
RO_DIR_NLINK = 0x0020
RO_EXTRA_ISIZE = 0x0040
RO_HAS_SNAPSHOT = 0x0080
RO_QUOTA = 0x0100
RO_BIGALLOC = 0x0200
RO_METADATA_CSUM = 0x0400
RO_REPLICA = 0x0800
RO_READONLY = 0x1000
RO_PROJECT = 0x2000
RO_SHARED_BLOCKS = 0x4000
RO_VERITY = 0x8000
RO_ORPHAN_PRESENT = 0x10000
#: Read-only-compatible features we accept. ``has_snapshot`` (next3 snapshots keep
#: snapshot data in blocks the plain bitmap may show free) is deliberately absent.
RO_KNOWN = (
    RO_SPARSE_SUPER
    | RO_LARGE_FILE
    | RO_BTREE_DIR
    | RO_HUGE_FILE
    | RO_GDT_CSUM
    | RO_DIR_NLINK
    | RO_EXTRA_ISIZE
    | RO_QUOTA
    | RO_BIGALLOC
    | RO_METADATA_CSUM
    | RO_REPLICA
    | RO_READONLY
    | RO_PROJECT
    | RO_SHARED_BLOCKS
    | RO_VERITY
    | RO_ORPHAN_PRESENT
)
#: What ext3 may use; anything beyond makes blkid (and we) call it ext4.
_EXT3_INCOMPAT = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG
_EXT3_RO = RO_SPARSE_SUPER | RO_LARGE_FILE | RO_BTREE_DIR

BG_INODE_UNINIT = 0x0001
BG_BLOCK_UNINIT = 0x0002
#: ``bg_block_bitmap_csum_hi`` exists when descriptors are at least this long.
_DESC_CSUM_HI_END = 0x3A

MMP_MAGIC = 0x004D4D50
MMP_SEQ_CLEAN = 0xFF4D4D50
MMP_SEQ_FSCK = 0xE24D4D50


@dataclass(frozen=True)
class Superblock:
    """The fields of an ext2/3/4 superblock this driver uses, validated."""

    raw: bytes
    blocks_count: int
    first_data_block: int
    block_size: int
    cluster_ratio: int
    blocks_per_group: int
    clusters_per_group: int
    inodes_per_group: int
    inode_size: int
    state: int
    rev_level: int
    compat: int
    incompat: int
    ro_compat: int
    uuid: bytes
    label: str
    reserved_gdt_blocks: int
    journal_inum: int
    desc_size: int
    first_meta_bg: int
    mmp_block: int
    checksum_type: int
    backup_bgs: tuple[int, int]
    checksum_seed: int
    checksum: int
    free_blocks_count: int
    free_inodes_count: int

    @property
    def cluster_size(self) -> int:
        return self.block_size * self.cluster_ratio

    @property
    def groups(self) -> int:
        return -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)

    @property
    def type_name(self) -> str:
        if self.incompat & ~_EXT3_INCOMPAT or self.ro_compat & ~_EXT3_RO:
            return "ext4"
        return "ext3" if self.compat & COMPAT_HAS_JOURNAL else "ext2"

    def has(self, incompat: int = 0, ro_compat: int = 0, compat: int = 0) -> bool:
        return bool(self.incompat & incompat or self.ro_compat & ro_compat or self.compat & compat)

    @property
    def group_desc_csum(self) -> bool:
        """Descriptors carry checksums and ``BLOCK_UNINIT`` means what it says."""
        return self.has(ro_compat=RO_GDT_CSUM | RO_METADATA_CSUM)


def parse_superblock(raw: bytes, where: str) -> Superblock:
    def u16(off: int) -> int:
        return int(struct.unpack_from("<H", raw, off)[0])

    def u32(off: int) -> int:
        return int(struct.unpack_from("<I", raw, off)[0])

    rev = u32(0x4C)
    dynamic = rev >= 1
    compat = u32(0x5C) if dynamic else 0
    incompat = u32(0x60) if dynamic else 0
    ro_compat = u32(0x64) if dynamic else 0
    log_block = u32(0x18)
    if log_block > 6:
        raise CorruptImageError(f"{where}: superblock s_log_block_size {log_block} (block size over 64 KiB)")
    block_size = 1024 << log_block
    bigalloc = bool(ro_compat & RO_BIGALLOC)
    log_cluster = u32(0x1C)
    if bigalloc:
        if not log_block <= log_cluster <= 20:
            raise CorruptImageError(
                f"{where}: superblock s_log_cluster_size {log_cluster} is not between the block size "
                f"({log_block}) and 20"
            )
        ratio = 1 << (log_cluster - log_block)
    else:
        ratio = 1
    wide = bool(incompat & INCOMPAT_64BIT)
    blocks = u32(0x04) | ((u32(0x150) << 32) if wide else 0)
    desc_size = u16(0xFE) if wide else 32
    sb = Superblock(
        raw=raw,
        blocks_count=blocks,
        first_data_block=u32(0x14),
        block_size=block_size,
        cluster_ratio=ratio,
        blocks_per_group=u32(0x20),
        clusters_per_group=u32(0x24) if bigalloc else u32(0x20),
        inodes_per_group=u32(0x28),
        inode_size=u16(0x58) if dynamic else 128,
        state=u16(0x3A),
        rev_level=rev,
        compat=compat,
        incompat=incompat,
        ro_compat=ro_compat,
        uuid=raw[0x68:0x78],
        label=raw[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace"),
        reserved_gdt_blocks=u16(0xCE) if dynamic else 0,
        journal_inum=u32(0xE0),
        desc_size=desc_size,
        first_meta_bg=u32(0x104),
        mmp_block=int(struct.unpack_from("<Q", raw, 0x168)[0]),
        checksum_type=raw[0x175],
        backup_bgs=(u32(0x24C), u32(0x250)),
        checksum_seed=u32(0x270),
        checksum=u32(0x3FC),
        free_blocks_count=u32(0x0C) | ((u32(0x158) << 32) if wide else 0),
        free_inodes_count=u32(0x10),
    )
    validate(sb, where)
    return sb


def validate(sb: Superblock, where: str) -> None:
    """Reject numbers no valid ext2/3/4 can have; each would mislead the layout."""
    problems = []
    if sb.rev_level > 1:
        problems.append(f"s_rev_level {sb.rev_level} is unknown")
    cpg = sb.clusters_per_group
    if not (8 <= cpg <= 8 * sb.block_size and cpg % 8 == 0):
        problems.append(f"{cpg} clusters per group do not fit one {sb.block_size}-byte bitmap")
    if sb.blocks_per_group != cpg * sb.cluster_ratio:
        problems.append(
            f"s_blocks_per_group {sb.blocks_per_group} is not {cpg} clusters of {sb.cluster_ratio} blocks"
        )
    expected_first = 1 if sb.block_size == 1024 and sb.cluster_ratio == 1 else 0
    if sb.first_data_block != expected_first:
        problems.append(f"s_first_data_block is {sb.first_data_block}, expected {expected_first}")
    if sb.blocks_count <= sb.first_data_block:
        problems.append(f"s_blocks_count {sb.blocks_count} leaves no block group")
    if not (0 < sb.inodes_per_group <= 8 * sb.block_size):
        problems.append(f"s_inodes_per_group {sb.inodes_per_group} does not fit one inode bitmap")
    if sb.inode_size < 128 or sb.inode_size > sb.block_size or sb.inode_size & (sb.inode_size - 1):
        problems.append(f"s_inode_size {sb.inode_size} is not a power of two in [128, block size]")
    if sb.incompat & INCOMPAT_64BIT and not (
        64 <= sb.desc_size <= 1024 and sb.desc_size & (sb.desc_size - 1) == 0
    ):
        problems.append(f"s_desc_size {sb.desc_size} is not a power of two in [64, 1024]")
    if problems:
        raise CorruptImageError(f"{where}: ext superblock: " + "; ".join(problems))


def check_safe(sb: Superblock, volume: Volume, where: str, *, stale_ok: bool = False) -> None:
    """Refuse a filesystem whose bitmaps on disk may not be the truth, or that we cannot read.

    ``stale_ok`` (an estimate, nothing punched): a mounted or crashed filesystem's
    bitmaps are read as they stand; everything else is still checked.
    """
    name = sb.type_name
    fix = "boot the VM and shut it down cleanly, or run e2fsck -f on the image, then retry"
    if stale_ok:
        pass
    elif sb.incompat & INCOMPAT_RECOVER:
        raise UnsupportedImageError(
            f"{where}: {name} journal needs recovery (the filesystem is mounted by a running or "
            f"crashed guest); its block bitmaps may be stale, nothing was changed: {fix}"
        )
    if sb.state & STATE_ERROR:
        raise UnsupportedImageError(
            f"{where}: {name} has recorded errors (s_state {sb.state:#x}): run e2fsck -f"
        )
    if not stale_ok and (not sb.state & STATE_VALID or sb.state & STATE_ORPHANS):
        raise UnsupportedImageError(
            f"{where}: {name} was not cleanly unmounted (s_state {sb.state:#x}); its block bitmaps "
            f"may be stale, nothing was changed: {fix}"
        )
    unknown = sb.incompat & ~INCOMPAT_KNOWN
    if unknown:
        raise UnsupportedImageError(
            f"{where}: {name} uses incompatible features {unknown:#x} this driver does not know"
        )
    if sb.ro_compat & ~RO_KNOWN:
        raise UnsupportedImageError(
            f"{where}: {name} uses read-only-compatible features {sb.ro_compat & ~RO_KNOWN:#x} "
            "(snapshots or unknown) whose blocks a bitmap may not show"
        )
    if sb.compat & COMPAT_EXCLUDE_BITMAP:
        raise UnsupportedImageError(f"{where}: {name} has snapshot exclude bitmaps (next3); not supported")
    if sb.incompat & INCOMPAT_COMPRESSION:
        raise UnsupportedImageError(f"{where}: {name} uses the never-merged compression feature")
    if sb.blocks_count * sb.block_size > volume.length:
        raise CorruptImageError(
            f"{where}: {name} superblock says {sb.blocks_count} blocks of {sb.block_size} bytes "
            f"({sb.blocks_count * sb.block_size} bytes) but the volume holds {volume.length}"
        )
    if sb.ro_compat & RO_METADATA_CSUM:
        if sb.checksum_type != 1:
            raise UnsupportedImageError(f"{where}: {name} s_checksum_type {sb.checksum_type} is not crc32c")
        actual = crc32c(0xFFFFFFFF, sb.raw[:0x3FC])
        if actual != sb.checksum:
            raise CorruptImageError(
                f"{where}: {name} superblock checksum {sb.checksum:#010x} does not match {actual:#010x}"
            )
    if sb.incompat & INCOMPAT_MMP:
        check_mmp(sb, volume, where)


def check_mmp(sb: Superblock, volume: Volume, where: str) -> None:
    """Multi-mount protection: a sequence other than "clean" means a node uses the fs."""
    if not sb.first_data_block < sb.mmp_block < sb.blocks_count:
        raise CorruptImageError(f"{where}: MMP block {sb.mmp_block} lies outside the filesystem")
    block = volume.read(sb.mmp_block * sb.block_size, 8, "ext4 MMP block")
    magic, seq = struct.unpack("<II", block)
    if magic != MMP_MAGIC:
        raise CorruptImageError(f"{where}: MMP block {sb.mmp_block} has magic {magic:#x}")
    if seq == MMP_SEQ_FSCK:
        raise ImageBusyError(f"{where}: ext4 MMP says e2fsck is running on this filesystem")
    if seq != MMP_SEQ_CLEAN:
        raise ImageBusyError(f"{where}: ext4 MMP sequence {seq:#x}: the filesystem is in use by another node")
