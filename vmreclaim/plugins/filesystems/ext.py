"""Driver ``ext``: free blocks of ext2, ext3 and ext4 from their on-disk block bitmaps.

The layout (Linux ``fs/ext4/ext4.h``, e2fsprogs ``lib/ext2fs``): the volume is cut into
block groups of ``s_blocks_per_group`` blocks; each group has a descriptor (32 bytes, or
``s_desc_size`` under ``64bit``) pointing at its block bitmap, one bit per block — one
per *cluster* under ``bigalloc`` — where 0 means free. This driver

* finds the descriptors where the kernel does: right after the superblock, or one block
  per meta-group at the start of its first group (``meta_bg``, from ``s_first_meta_bg``);
* reads only the bitmaps of initialised groups; a group flagged ``BLOCK_UNINIT`` (only
  meaningful with ``uninit_bg``/``metadata_csum``) has no bitmap on disk and is free but
  for its metadata, which is added back below;
* verifies every checksum the filesystem keeps (superblock and bitmaps under
  ``metadata_csum``, descriptors under either checksum feature) and that no bitmap shows
  more free clusters than its descriptor counts — a stale or corrupt bitmap is refused,
  never trusted;
* removes from the free set every block the layout says is metadata (superblock and
  descriptor backups, reserved GDT blocks, every group's bitmaps and inode table, the
  MMP block), whatever a bitmap says, so a damaged bitmap cannot free them;
* refuses a filesystem whose journal needs recovery, that was not cleanly unmounted,
  that has recorded errors, or that uses an incompatible feature it does not know: in
  each case the bitmaps on disk may not be the truth.

The bitmaps become byte ranges with ``np.unpackbits`` and run detection in numpy, a few
hundred groups per step, so a multi-terabyte filesystem costs seconds.

Why not ``dissect.extfs``: it is a file reader (inodes, directories, extents) with no
free-space or bitmap API, raises on bigalloc, assumes descriptors follow the superblock
(no meta_bg), verifies no checksums, parses one structure at a time in Python, and is
AGPL-3.0. What this driver needs is the allocation metadata, checked and vectorised.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import CorruptImageError, ImageBusyError, UnsupportedImageError
from vmreclaim.core.filesystems import Detection, FilesystemReader, FreeSpace, ProgressCallback
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.core.volumes import Volume
from vmreclaim.plugins.filesystems.checksums import crc16, crc16_rows, crc32c, crc32c_rows

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

BG_BLOCK_UNINIT = 0x0002
#: ``bg_block_bitmap_csum_hi`` exists when descriptors are at least this long.
_DESC_CSUM_HI_END = 0x3A

MMP_MAGIC = 0x004D4D50
MMP_SEQ_CLEAN = 0xFF4D4D50
MMP_SEQ_FSCK = 0xE24D4D50

#: Groups turned into ranges per numpy step (bounded memory: 256 × 32768 bits).
GROUP_BATCH = 256
#: Largest single read of bitmap blocks.
MAX_BITMAP_READ = 16 * 1024 * 1024


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


def _parse_superblock(raw: bytes, where: str) -> Superblock:
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
    )
    _validate(sb, where)
    return sb


def _validate(sb: Superblock, where: str) -> None:
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


class ExtReader(FilesystemReader):
    """ext2, ext3 and ext4: free blocks from the block bitmaps."""

    def probe(self, volume: Volume) -> Detection | None:
        if volume.length < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE:
            return None
        raw = volume.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, "ext superblock")
        if struct.unpack_from("<H", raw, 0x38)[0] != MAGIC:
            return None
        try:
            sb = _parse_superblock(raw, _where(volume))
        except CorruptImageError:
            # Two bytes of magic alone can be chance; a real superblock would validate.
            return None
        detection = Detection(
            type=sb.type_name, block_size=sb.cluster_size, label=sb.label, uuid=str(uuid.UUID(bytes=sb.uuid))
        )
        if sb.incompat & INCOMPAT_JOURNAL_DEV:
            return Detection(
                type="jbd",
                block_size=sb.block_size,
                label=sb.label,
                uuid=detection.uuid,
                skip_reason="ext3/ext4 external journal device: holds no files",
            )
        return detection

    def free_space(
        self,
        volume: Volume,
        detection: Detection,
        progress: ProgressCallback | None = None,
        *,
        estimate: bool = False,
    ) -> FreeSpace:
        where = _where(volume)
        raw = volume.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, "ext superblock")
        sb = _parse_superblock(raw, where)
        _check_safe(sb, volume, where, stale_ok=estimate)
        layout = _Layout(sb, volume, where)
        free = layout.free_clusters(progress)
        return FreeSpace(free=free, block_size=sb.cluster_size, size=sb.blocks_count * sb.block_size)


def _where(volume: Volume) -> str:
    return f"{volume.image.file.path}: {volume.label}"


def _check_safe(sb: Superblock, volume: Volume, where: str, *, stale_ok: bool = False) -> None:
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
        _check_mmp(sb, volume, where)


def _check_mmp(sb: Superblock, volume: Volume, where: str) -> None:
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


class _Layout:
    """Group descriptors of one filesystem, as numpy columns."""

    def __init__(self, sb: Superblock, volume: Volume, where: str) -> None:
        self.sb = sb
        self.volume = volume
        self.where = where
        self.groups = sb.groups
        self.descs_per_block = sb.block_size // sb.desc_size
        self.desc_blocks = -(-self.groups // self.descs_per_block)
        self.csum_seed = self._csum_seed()
        desc = self._read_descriptors()
        self.desc = desc

        def col(off: int, width: int) -> npt.NDArray[np.uint64]:
            dtype = {2: "<u2", 4: "<u4"}[width]
            return np.ascontiguousarray(desc[:, off : off + width]).view(dtype).ravel().astype(np.uint64)

        wide = sb.desc_size >= 64
        self.block_bitmap = col(0x00, 4) | ((col(0x20, 4) << np.uint64(32)) if wide else 0)
        self.inode_bitmap = col(0x04, 4) | ((col(0x24, 4) << np.uint64(32)) if wide else 0)
        self.inode_table = col(0x08, 4) | ((col(0x28, 4) << np.uint64(32)) if wide else 0)
        self.free_count = col(0x0C, 2) | ((col(0x2C, 2) << np.uint64(16)) if wide else 0)
        self.flags = col(0x12, 2)
        self.bitmap_csum = col(0x18, 2) | (
            (col(0x38, 2) << np.uint64(16)) if sb.desc_size >= _DESC_CSUM_HI_END else 0
        )
        self.inode_table_blocks = -(-sb.inodes_per_group * sb.inode_size // sb.block_size)
        self._check_descriptors()
        if sb.group_desc_csum:
            self.uninit = (self.flags & np.uint64(BG_BLOCK_UNINIT)) != 0
        else:
            # Without group checksums the kernel ignores bg_flags and reads every bitmap.
            self.uninit = np.zeros(self.groups, dtype=bool)

    # -- descriptors ---------------------------------------------------------------------

    def _csum_seed(self) -> int:
        sb = self.sb
        if sb.incompat & INCOMPAT_CSUM_SEED:
            return sb.checksum_seed
        return crc32c(0xFFFFFFFF, sb.uuid)

    def group_first_block(self, group: npt.NDArray[np.int64] | int) -> npt.NDArray[np.int64] | int:
        return self.sb.first_data_block + group * self.sb.blocks_per_group

    def has_super(self, groups: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which groups hold a superblock backup (``ext4_bg_has_super``)."""
        sb = self.sb
        if sb.compat & COMPAT_SPARSE_SUPER2:
            backups: npt.NDArray[np.bool_] = (
                (groups == 0) | (groups == sb.backup_bgs[0]) | (groups == sb.backup_bgs[1])
            )
            return backups
        if not sb.ro_compat & RO_SPARSE_SUPER:
            return np.ones(groups.shape, dtype=bool)
        powers = [0, 1]
        for base in (3, 5, 7):
            p = base
            while p < max(self.groups, 2):
                powers.append(p)
                p *= base
        return np.isin(groups, np.array(powers, dtype=np.int64))

    def _desc_block_location(self, index: int) -> int:
        """Where descriptor block ``index`` lives (``ext4``'s ``descriptor_loc``)."""
        sb = self.sb
        zero_adjust = 1 if sb.block_size == 1024 and sb.first_data_block == 0 and index == 0 else 0
        if not sb.incompat & INCOMPAT_META_BG or index < sb.first_meta_bg:
            return sb.first_data_block + index + 1 + zero_adjust
        group = index * self.descs_per_block
        has_super = int(self.has_super(np.array([group], dtype=np.int64))[0])
        return int(self.group_first_block(group)) + has_super + zero_adjust

    def _read_descriptors(self) -> npt.NDArray[np.uint8]:
        sb = self.sb
        bs = sb.block_size
        locations = np.array([self._desc_block_location(i) for i in range(self.desc_blocks)], dtype=np.int64)
        bad = np.flatnonzero((locations <= 0) | (locations >= sb.blocks_count))
        if bad.size:
            raise CorruptImageError(
                f"{self.where}: group descriptor block {int(bad[0])} would lie at block "
                f"{int(locations[bad[0]])}, outside the filesystem"
            )
        buf = self._read_blocks(locations, bs, "group descriptor block")
        return buf.reshape(-1, sb.desc_size)[: self.groups]

    def _read_blocks(self, locations: npt.NDArray[np.int64], nbytes: int, what: str) -> npt.NDArray[np.uint8]:
        """One row per location (``nbytes`` from each block), reading runs of adjacent
        blocks in single reads: flex_bg packs a flex group's bitmaps together."""
        bs = self.sb.block_size
        out = np.empty((locations.size, nbytes), dtype=np.uint8)
        if not locations.size:
            return out
        order = np.argsort(locations, kind="stable")
        sorted_locs = locations[order]
        breaks = np.flatnonzero(np.diff(sorted_locs) != 1) + 1
        max_run = max(1, MAX_BITMAP_READ // bs)
        for run in np.split(np.arange(sorted_locs.size), breaks):
            for piece in np.array_split(run, -(-run.size // max_run)):
                first = int(sorted_locs[piece[0]])
                data = self.volume.read(first * bs, piece.size * bs, f"{what} at block {first}")
                rows = np.frombuffer(data, dtype=np.uint8).reshape(piece.size, bs)
                out[order[piece]] = rows[:, :nbytes]
        return out

    def _check_descriptors(self) -> None:
        sb = self.sb
        end = sb.blocks_count
        for name, column, length in (
            ("block bitmap", self.block_bitmap, 1),
            ("inode bitmap", self.inode_bitmap, 1),
            ("inode table", self.inode_table, self.inode_table_blocks),
        ):
            bad = np.flatnonzero((column < sb.first_data_block) | (column + np.uint64(length) > end))
            if bad.size:
                g = int(bad[0])
                raise CorruptImageError(
                    f"{self.where}: group {g} descriptor puts its {name} at block {int(column[g])}, "
                    f"outside blocks [{sb.first_data_block}, {end})"
                )
        if not sb.incompat & INCOMPAT_FLEX_BG:
            # Without flex_bg every group keeps its bitmaps and inode table inside itself
            # (the kernel's ext4_check_descriptors insists on it too).
            first = sb.first_data_block + np.arange(self.groups, dtype=np.uint64) * np.uint64(
                sb.blocks_per_group
            )
            last = np.minimum(first + np.uint64(sb.blocks_per_group), np.uint64(end))
            for name, column, length in (
                ("block bitmap", self.block_bitmap, 1),
                ("inode bitmap", self.inode_bitmap, 1),
                ("inode table", self.inode_table, self.inode_table_blocks),
            ):
                bad = np.flatnonzero((column < first) | (column + np.uint64(length) > last))
                if bad.size:
                    g = int(bad[0])
                    raise CorruptImageError(
                        f"{self.where}: group {g} descriptor puts its {name} at block {int(column[g])}, "
                        f"outside the group's blocks [{int(first[g])}, {int(last[g])}) (no flex_bg)"
                    )
        if not sb.group_desc_csum:
            return
        groups = np.arange(self.groups, dtype=np.uint32)
        le_groups = groups.astype("<u4").view(np.uint8).reshape(-1, 4)
        if sb.ro_compat & RO_METADATA_CSUM:
            zeroed = self.desc.copy()
            zeroed[:, 0x1E:0x20] = 0
            seeds = crc32c_rows(self.csum_seed, le_groups)
            expected = crc32c_rows(seeds, zeroed) & np.uint32(0xFFFF)
        else:
            parts = [le_groups, self.desc[:, :0x1E]]
            if sb.incompat & INCOMPAT_64BIT and sb.desc_size > 0x20:
                parts.append(self.desc[:, 0x20:])
            expected = crc16_rows(crc16(0xFFFF, sb.uuid), np.concatenate(parts, axis=1))
        stored = np.ascontiguousarray(self.desc[:, 0x1E:0x20]).view("<u2").ravel()
        bad = np.flatnonzero(expected != stored)
        if bad.size:
            g = int(bad[0])
            raise CorruptImageError(
                f"{self.where}: group {g} descriptor checksum {int(stored[g]):#06x} does not match "
                f"{int(expected[g]):#06x} ({bad.size} groups fail)"
            )

    # -- free space ------------------------------------------------------------------------

    def free_clusters(self, progress: ProgressCallback | None) -> RangeSet:
        sb = self.sb
        cpg = sb.clusters_per_group
        nbytes = cpg // 8
        starts: list[npt.NDArray[np.int64]] = []
        ends: list[npt.NDArray[np.int64]] = []
        # Clusters that exist: the last group may be short.
        total_clusters = -(-(sb.blocks_count - sb.first_data_block) // sb.cluster_ratio)
        for g0 in range(0, self.groups, GROUP_BATCH):
            g1 = min(self.groups, g0 + GROUP_BATCH)
            bits = self._bitmap_batch(g0, g1, nbytes)
            free = np.unpackbits(bits, axis=1, bitorder="little")[:, :cpg] == 0
            self._check_counts(g0, g1, free, total_clusters)
            flat = free.ravel()
            first_cluster = g0 * cpg
            flat = flat[: max(0, min(flat.size, total_clusters - first_cluster))]
            edges = np.diff(np.concatenate(([0], flat.view(np.int8), [0])))
            run_start = np.flatnonzero(edges == 1).astype(np.int64) + first_cluster
            run_end = np.flatnonzero(edges == -1).astype(np.int64) + first_cluster
            starts.append(run_start)
            ends.append(run_end)
            if progress is not None:
                progress(g1, self.groups)
        if not starts:
            return RangeSet()
        unit = sb.cluster_size
        base = sb.first_data_block * sb.block_size
        free_bytes = RangeSet(np.concatenate(starts) * unit + base, np.concatenate(ends) * unit + base)
        fs_bytes = sb.blocks_count * sb.block_size
        free_bytes = free_bytes.clip(ByteRange(0, fs_bytes))
        metadata = self.metadata_bytes()
        self._check_metadata_in_use(free_bytes, metadata)
        return free_bytes.subtract(metadata)

    def _check_metadata_in_use(self, free: RangeSet, metadata: RangeSet) -> None:
        """An initialised bitmap always marks the layout's metadata in use. One that
        shows a superblock, descriptor, bitmap or inode-table block free is not this
        group's bitmap (a descriptor pointing at the wrong block, a stale copy): refuse,
        even where no checksum could tell."""
        sb = self.sb
        uninit = np.flatnonzero(self.uninit).astype(np.int64)
        first = (sb.first_data_block + uninit * sb.blocks_per_group) * sb.block_size
        from_bitmaps = free.subtract(RangeSet(first, first + sb.blocks_per_group * sb.block_size))
        clash = from_bitmaps.intersect(metadata)
        if clash:
            byte = int(clash.starts[0])
            block = byte // sb.block_size
            group = (block - sb.first_data_block) // sb.blocks_per_group
            raise CorruptImageError(
                f"{self.where}: block bitmap of group {group} (at block "
                f"{int(self.block_bitmap[min(group, self.groups - 1)])}) marks metadata block {block} "
                f"free ({clash.total} bytes of metadata in all): it cannot be the real bitmap; "
                "run e2fsck -f"
            )

    def _bitmap_batch(self, g0: int, g1: int, nbytes: int) -> npt.NDArray[np.uint8]:
        """Block bitmaps of groups ``[g0, g1)``; all zero (free) for BLOCK_UNINIT groups."""
        bits = np.zeros((g1 - g0, nbytes), dtype=np.uint8)
        init = np.flatnonzero(~self.uninit[g0:g1])
        if not init.size:
            return bits
        locations = self.block_bitmap[g0:g1][init].astype(np.int64)
        rows = self._read_blocks(locations, nbytes, "block bitmap")
        if self.sb.ro_compat & RO_METADATA_CSUM:
            actual = crc32c_rows(self.csum_seed, rows)
            stored = self.bitmap_csum[g0:g1][init].astype(np.uint32)
            if self.sb.desc_size < _DESC_CSUM_HI_END:
                actual = actual & np.uint32(0xFFFF)
            bad = np.flatnonzero(actual != stored)
            if bad.size:
                g = g0 + int(init[bad[0]])
                raise CorruptImageError(
                    f"{self.where}: block bitmap of group {g} at block {int(self.block_bitmap[g])} "
                    f"fails its checksum ({int(actual[bad[0]]):#x} != {int(stored[bad[0]]):#x}); "
                    "run e2fsck -f"
                )
        bits[init] = rows
        return bits

    def _check_counts(self, g0: int, g1: int, free: npt.NDArray[np.bool_], total_clusters: int) -> None:
        """A bitmap must not show more free clusters than its descriptor counts: if it
        does, one of them is stale or corrupt and the bitmap cannot be trusted."""
        cpg = self.sb.clusters_per_group
        valid = np.clip(total_clusters - np.arange(g0, g1, dtype=np.int64) * cpg, 0, cpg)
        cols = np.arange(cpg)
        counted = (free & (cols[None, :] < valid[:, None])).sum(axis=1)
        init = ~self.uninit[g0:g1]
        stored = self.free_count[g0:g1].astype(np.int64)
        bad = np.flatnonzero(init & (counted > stored))
        if bad.size:
            g = g0 + int(bad[0])
            raise CorruptImageError(
                f"{self.where}: block bitmap of group {g} at block {int(self.block_bitmap[g])} shows "
                f"{int(counted[bad[0]])} free clusters but its descriptor counts {int(stored[bad[0]])}; "
                "the bitmap may be stale or corrupt: run e2fsck -f"
            )

    def metadata_bytes(self) -> RangeSet:
        """Every block the layout reserves, whatever the bitmaps say (byte ranges)."""
        sb = self.sb
        groups = np.arange(self.groups, dtype=np.int64)
        first = self.sb.first_data_block + groups * sb.blocks_per_group
        if sb.block_size == 1024 and sb.first_data_block == 0:
            first = np.where(groups == 0, 1, first)  # 1 KiB bigalloc: the superblock is block 1
        has_super = self.has_super(groups)
        starts = [
            np.array([0]),
            self.block_bitmap.astype(np.int64),
            self.inode_bitmap.astype(np.int64),
            self.inode_table.astype(np.int64),
        ]
        lengths = [
            np.array([sb.first_data_block + 1]),
            np.ones(self.groups, np.int64),
            np.ones(self.groups, np.int64),
            np.full(self.groups, self.inode_table_blocks, np.int64),
        ]
        meta_bg = bool(sb.incompat & INCOMPAT_META_BG)
        old_desc = sb.first_meta_bg if meta_bg else self.desc_blocks + sb.reserved_gdt_blocks
        if meta_bg:
            in_old = groups // self.descs_per_block < sb.first_meta_bg
        else:
            in_old = np.ones(self.groups, dtype=bool)
        sel = has_super & in_old
        starts.append(first[sel])
        lengths.append(np.full(int(sel.sum()), 1 + old_desc, np.int64))
        sel = has_super & ~in_old
        starts.append(first[sel])
        lengths.append(np.ones(int(sel.sum()), np.int64))
        if meta_bg:
            pos = groups % self.descs_per_block
            sel = ~in_old & ((pos == 0) | (pos == 1) | (pos == self.descs_per_block - 1))
            starts.append(first[sel] + has_super[sel].astype(np.int64))
            lengths.append(np.ones(int(sel.sum()), np.int64))
        if sb.incompat & INCOMPAT_MMP:
            starts.append(np.array([sb.mmp_block]))
            lengths.append(np.array([1]))
        s = np.concatenate(starts).astype(np.int64)
        n = np.concatenate(lengths).astype(np.int64)
        # Whole clusters: under bigalloc a block in use pins its cluster.
        unit = sb.cluster_size
        lo = (s * sb.block_size) // unit * unit
        hi = -(-((s + n) * sb.block_size) // unit) * unit
        return RangeSet(lo, hi)
