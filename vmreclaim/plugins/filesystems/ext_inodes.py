"""Cross-check the ext block bitmaps against the inodes (issue 11 item 2).

Every count and checksum of a filesystem can agree while its block bitmap lies: a guest
(or damage) that marks a file's block free and a free block used in the same group keeps
the group's count, the superblock total and the bitmap checksum consistent. The only
witness left is the inode that still points at the block. So before the free set is
returned, every in-use inode's block map is walked and any block it names that lies in the
free set is a refusal (:class:`CorruptImageError`, exit 4). The walk can only turn an
answer into a refusal: it never adds free space.

What an inode names (Linux ``fs/ext4/ext4.h``, ``ext4_extents.h``): with
``EXTENTS_FL`` an extent tree in ``i_block`` (header magic ``0xF30A``; index entries at
depth > 0 point at child tree blocks, leaf entries at data runs, uninitialised ones still
allocated); otherwise the classic map (12 direct, then single/double/triple indirect
blocks of 32-bit numbers). Inline data, fast symlinks and device nodes name no blocks.
The xattr block ``i_file_acl`` is checked too. Special inodes below ``s_first_ino``
(journal 8, resize 7 whose double-indirect map names the reserved GDT blocks, bad blocks
1) are walked like files. Block numbers past the filesystem's end, trees deeper than
:data:`MAX_DEPTH`, headers that do not fit their block and a tree block met twice are
refused: a hostile tree cannot loop, recurse without bound or send a read off the disk.

Only the inode-table blocks holding in-use inodes are read, and the per-inode fields are
pulled out of them with numpy; the walk itself is per inode, the check vectorised.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import CorruptImageError
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.volumes import Volume
from vmreclaim.plugins.filesystems.ext_superblock import BG_INODE_UNINIT, INCOMPAT_64BIT, Superblock

EXTENT_MAGIC = 0xF30A
#: The kernel's own limit is 5 (``EXT4_MAX_EXTENT_DEPTH``); deeper is hostile.
MAX_DEPTH = 5
EXTENTS_FL = 0x00080000
INLINE_DATA_FL = 0x10000000
S_IFMT = 0xF000
S_IFREG = 0x8000
S_IFDIR = 0x4000
S_IFLNK = 0xA000
#: Single-indirect blocks read per batch (bounded memory: 4096 blocks of at most 64 KiB).
PENDING_BATCH = 4096


class LayoutLike(Protocol):
    """What the walk needs from :class:`ext._Layout` (kept as a protocol: no cycle)."""

    sb: Superblock
    volume: Volume
    where: str
    groups: int
    desc: npt.NDArray[np.uint8]
    inode_bitmap: npt.NDArray[Any]
    inode_table: npt.NDArray[Any]
    flags: npt.NDArray[Any]

    def _read_blocks(
        self, locations: npt.NDArray[np.int64], nbytes: int, what: str
    ) -> npt.NDArray[np.uint8]: ...


class _Walker:
    """Collects (first block, count, inode) of everything one filesystem's inodes name."""

    def __init__(self, layout: LayoutLike) -> None:
        self.layout = layout
        self.sb = layout.sb
        self.bs = layout.sb.block_size
        self.end = layout.sb.blocks_count
        self.where = layout.where
        self.starts: list[int] = []
        self.counts: list[int] = []
        self.owners: list[int] = []
        #: Tree and indirect blocks read in all: bounded by the filesystem's size.
        self.visited = 0
        self.pending: list[int] = []
        self.pending_owners: list[int] = []

    def refuse(self, ino: int, what: str) -> CorruptImageError:
        return CorruptImageError(f"{self.where}: inode {ino} {what}; run e2fsck -f")

    def name(self, ino: int, start: int, count: int, what: str) -> None:
        if start < self.sb.first_data_block or start + count > self.end or count <= 0:
            raise self.refuse(
                ino,
                f"names {what} {start} (+{count}) outside blocks [{self.sb.first_data_block}, {self.end})",
            )
        self.starts.append(start)
        self.counts.append(count)
        self.owners.append(ino)

    def read(self, ino: int, block: int, what: str) -> bytes:
        self.name(ino, block, 1, what)
        self.visited += 1
        if self.visited > self.end:
            raise self.refuse(ino, f"leads the walk through more blocks than the fs has ({what} {block})")
        return self.layout.volume.read(block * self.bs, self.bs, f"ext inode {ino} {what} {block}")

    # -- extent trees ----------------------------------------------------------------------

    def extents(self, ino: int, node: bytes, depth_above: int | None, seen: set[int]) -> None:
        magic, entries, maximum, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != EXTENT_MAGIC:
            raise self.refuse(ino, f"has an extent header with magic {magic:#06x}, not {EXTENT_MAGIC:#06x}")
        if depth > MAX_DEPTH or (depth_above is not None and depth != depth_above - 1):
            raise self.refuse(ino, f"has an extent tree node of depth {depth} (parent {depth_above})")
        if entries > maximum or 12 + 12 * maximum > len(node):
            raise self.refuse(ino, f"has an extent node of {entries}/{maximum} entries in {len(node)} bytes")
        for i in range(entries):
            off = 12 + 12 * i
            if depth == 0:
                _, length, hi, lo = struct.unpack_from("<IHHI", node, off)
                if length > 32768:  # uninitialised extent: still allocated
                    length -= 32768
                if length:
                    self.name(ino, (hi << 32) | lo, length, "extent at block")
            else:
                _, lo, hi = struct.unpack_from("<IIH", node, off)
                child = (hi << 32) | lo
                if child in seen:
                    raise self.refuse(ino, f"meets extent tree block {child} twice (a loop)")
                seen.add(child)
                self.extents(ino, self.read(ino, child, "extent tree block"), depth, seen)

    # -- classic indirect map ----------------------------------------------------------------

    def indirect(self, ino: int, block: int, level: int) -> None:
        if level == 1:
            # Most indirect blocks are single: they are read later in sorted batches.
            self.name(ino, block, 1, "level-1 indirect block")
            self.visited += 1
            self.pending.append(block)
            self.pending_owners.append(ino)
            if len(self.pending) >= PENDING_BATCH:
                self.flush()
            return
        data = self.read(ino, block, f"level-{level} indirect block")
        entries = np.frombuffer(data, dtype="<u4")
        for child in entries[entries != 0].astype(np.int64).tolist():
            self.indirect(ino, child, level - 1)

    def flush(self) -> None:
        """Read the pending single-indirect blocks and name every block they hold."""
        if not self.pending:
            return
        if self.visited > self.end:
            raise self.refuse(self.pending_owners[-1], "leads the walk through more blocks than the fs has")
        rows = self.layout._read_blocks(np.asarray(self.pending, dtype=np.int64), self.bs, "indirect block")
        entries = np.ascontiguousarray(rows).view("<u4").astype(np.int64)
        used = entries != 0
        blocks = entries[used]
        owners = np.repeat(np.asarray(self.pending_owners, dtype=np.int64), used.sum(axis=1))
        self.pending, self.pending_owners = [], []
        bad = np.flatnonzero((blocks < self.sb.first_data_block) | (blocks >= self.end))
        if bad.size:
            raise self.refuse(
                int(owners[bad[0]]),
                f"names block {int(blocks[bad[0]])} outside blocks [{self.sb.first_data_block}, {self.end})",
            )
        self.starts.extend(blocks.tolist())
        self.counts.extend([1] * blocks.size)
        self.owners.extend(owners.tolist())

    def _name_many(self, ino: int, blocks: npt.NDArray[np.int64], what: str) -> None:
        if not blocks.size:
            return
        bad = np.flatnonzero((blocks < self.sb.first_data_block) | (blocks >= self.end))
        if bad.size:
            raise self.refuse(
                ino,
                f"names {what} {int(blocks[bad[0]])} outside blocks [{self.sb.first_data_block}, {self.end})",
            )
        self.starts.extend(blocks.tolist())
        self.counts.extend([1] * blocks.size)
        self.owners.extend([ino] * blocks.size)

    # -- one inode ---------------------------------------------------------------------------

    def inode(self, ino: int, raw: bytes) -> None:
        mode, size_lo = struct.unpack_from("<HI", raw, 0)
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        acl = struct.unpack_from("<I", raw, 0x68)[0]
        if self.sb.incompat & INCOMPAT_64BIT:
            acl |= struct.unpack_from("<H", raw, 0x76)[0] << 32
        if acl:
            self.name(ino, acl, 1, "xattr block")
        kind = mode & S_IFMT
        i_block = raw[0x28:0x64]
        if flags & INLINE_DATA_FL:
            return
        if kind not in (S_IFREG, S_IFDIR, S_IFLNK) and not (kind == 0 and ino < self.first_ino):
            return  # devices, fifos, sockets: i_block holds no block numbers
        if flags & EXTENTS_FL:
            self.extents(ino, i_block, None, set())
            return
        if kind == S_IFLNK and size_lo < 60:
            return  # fast symlink: the target lives in i_block
        words = np.frombuffer(i_block, dtype="<u4").astype(np.int64)
        direct = words[:12]
        self._name_many(ino, direct[direct != 0], "block")
        for level, block in ((1, int(words[12])), (2, int(words[13])), (3, int(words[14]))):
            if block:
                self.indirect(ino, block, level)

    @property
    def first_ino(self) -> int:
        return int(struct.unpack_from("<I", self.sb.raw, 0x54)[0]) if self.sb.rev_level >= 1 else 11


def check_inode_blocks(layout: LayoutLike, free: RangeSet) -> None:
    """Refuse if any block an in-use inode names lies in ``free`` (byte ranges)."""
    if not free:
        return
    walker = _Walker(layout)
    for ino, raw in _in_use_inodes(layout):
        walker.inode(ino, raw)
    walker.flush()
    if not walker.starts:
        return
    bs = layout.sb.block_size
    lo = np.asarray(walker.starts, dtype=np.int64) * bs
    hi = lo + np.asarray(walker.counts, dtype=np.int64) * bs
    # First free range ending after each named range's start: they overlap if it starts before its end.
    idx = np.searchsorted(free.ends, lo, side="right")
    inside = idx < len(free)
    clash = np.zeros(lo.size, dtype=bool)
    clash[inside] = free.starts[idx[inside]] < hi[inside]
    bad = np.flatnonzero(clash)
    if bad.size:
        i = int(bad[0])
        block = max(int(lo[i]), int(free.starts[idx[i]])) // bs
        raise CorruptImageError(
            f"{layout.where}: inode {walker.owners[i]} uses block {block}, which the block bitmap marks "
            f"free ({bad.size} such references): the bitmap lies; nothing was changed, run e2fsck -f"
        )


def _in_use_inodes(layout: LayoutLike) -> Iterator[tuple[int, bytes]]:
    """(inode number, raw inode) of every inode its group's bitmap marks in use, reading
    only the inode-table blocks that hold one, one group at a time (bounded memory)."""
    sb = layout.sb
    ipg, isize, bs = sb.inodes_per_group, sb.inode_size, sb.block_size
    per_block = bs // isize
    if sb.group_desc_csum:
        unused = np.ascontiguousarray(layout.desc[:, 0x1C:0x1E]).view("<u2").ravel().astype(np.int64)
        if sb.desc_size >= 64:
            hi = np.ascontiguousarray(layout.desc[:, 0x32:0x34]).view("<u2").ravel().astype(np.int64)
            unused |= hi << 16
        live = np.clip(ipg - unused, 0, ipg)
        groups = np.flatnonzero(((layout.flags & np.uint64(BG_INODE_UNINIT)) == 0) & (live > 0))
    else:
        live = np.full(layout.groups, ipg, dtype=np.int64)
        groups = np.arange(layout.groups)
    bitmaps = layout._read_blocks(layout.inode_bitmap[groups].astype(np.int64), -(-ipg // 8), "inode bitmap")
    for row, g in enumerate(groups.tolist()):
        used = np.unpackbits(bitmaps[row], bitorder="little")[: int(live[g])]
        index = np.flatnonzero(used)
        if not index.size:
            continue
        blocks = np.unique(index // per_block)
        table = int(layout.inode_table[g])
        data = layout._read_blocks(blocks + table, bs, "inode table block")
        rows = {int(b): k for k, b in enumerate(blocks.tolist())}
        for i in index.tolist():
            block_row = data[rows[i // per_block]]
            off = (i % per_block) * isize
            raw = block_row[off : off + isize].tobytes()
            ino = g * ipg + i + 1
            links, dtime = struct.unpack_from("<H", raw, 0x1A)[0], struct.unpack_from("<I", raw, 0x14)[0]
            if links == 0 and dtime != 0:
                continue  # deleted: e2fsck would clear its bitmap bit; its blocks may be reused
            yield ino, raw
