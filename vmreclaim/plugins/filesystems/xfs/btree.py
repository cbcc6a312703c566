"""One allocation group's free space: the AGF, its two free-space B+trees, the AGFL.

XFS keeps each AG's free extents twice, in a B+tree by block (bnobt) and one by size
(cntbt), both rooted in the AGF (the AG's second sector). Blocks reserved for the
trees' own growth sit on the AG free list (AGFL, the fourth sector): free, but listed in
neither tree. ``xfs_db freesp`` counts both, and so do we.

Every check the format offers is made before an extent is called free:

* AGF and AGFL: magic, version, sequence number, length; on v5 the CRC32C, the
  filesystem UUID and (for tree blocks) the disk address and owning AG;
* each tree block: magic, level, record count within the block's capacity, the sibling
  chain at each level, node keys equal to the first key of the child they point to,
  records in the tree's order, every block visited once;
* the two trees must list exactly the same extents, and their total and longest must
  be the AGF's ``freeblks`` and ``longest``; no extent may overlap another, a tree
  block, an AGFL block, or leave the AG.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import CorruptImageError
from vmreclaim.core.volumes import Volume
from vmreclaim.plugins.filesystems.checksums import crc32c_rows
from vmreclaim.plugins.filesystems.xfs.sb import Superblock, verify_crc

NULL_AGBLOCK = 0xFFFFFFFF
MAX_LEVELS = 9
_AGF_CRC_OFFSET = 216
_AGFL_CRC_OFFSET = 32
_BLOCK_CRC_OFFSET = 52

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class AgFree:
    """The free extents of one AG, as AG block numbers ``[start, start + length)``."""

    starts: I64
    lengths: I64
    agfl: I64
    #: The AGF counters the sum over AGs is checked against the superblock with.
    freeblks: int
    flcount: int
    btreeblks: int


@dataclass(frozen=True)
class _Tree:
    name: str
    magic: bytes
    root: int
    levels: int


class AgReader:
    """Reads and checks one AG's free-space structures."""

    def __init__(self, volume: Volume, sb: Superblock, agno: int, where: str) -> None:
        self.volume, self.sb, self.agno = volume, sb, agno
        self.length = sb.ag_length(agno)
        self.where = f"{where}: xfs AG {agno}"
        self.hdr = 56 if sb.crc else 16
        self.visited: set[int] = set()

    def _fail(self, what: str) -> CorruptImageError:
        return CorruptImageError(f"{self.where}: {what}")

    def _ag_byte(self, agbno: int) -> int:
        return (self.agno * self.sb.agblocks + agbno) * self.sb.block_size

    def read(self) -> AgFree:
        sb = self.sb
        agf = self.volume.read(self._ag_byte(0) + sb.sector_size, sb.sector_size, f"AGF of AG {self.agno}")
        (magic, version, seqno, length, bnoroot, cntroot, _rmaproot, bnolevel, cntlevel) = struct.unpack_from(
            ">4sIIIIIIII", agf
        )
        flfirst, fllast, flcount, freeblks, longest, btreeblks = struct.unpack_from(">IIIIII", agf, 40)
        if magic != b"XAGF" or version != 1:
            raise self._fail("AGF has no XAGF magic or an unknown version")
        if sb.crc and not verify_crc(agf, _AGF_CRC_OFFSET):
            raise self._fail("AGF fails its CRC32C")
        if sb.crc and agf[64:80] != sb.meta_uuid:
            raise self._fail("AGF belongs to another filesystem (UUID)")
        if seqno != self.agno or length != self.length:
            raise self._fail(f"AGF says AG {seqno} of {length} blocks, expected {self.length}")
        if not (0 < bnolevel <= MAX_LEVELS and 0 < cntlevel <= MAX_LEVELS):
            raise self._fail(f"AGF tree levels {bnolevel}/{cntlevel} are impossible")
        agfl = self._agfl(flfirst, fllast, flcount)
        bno = self._walk(_Tree("bnobt", b"AB3B" if sb.crc else b"ABTB", bnoroot, bnolevel))
        cnt = self._walk(_Tree("cntbt", b"AB3C" if sb.crc else b"ABTC", cntroot, cntlevel))
        starts, lengths = bno[:, 0], bno[:, 1]
        if np.any(lengths <= 0) or np.any(starts + lengths > self.length):
            raise self._fail("bnobt holds an extent outside the AG")
        if np.any(starts[1:] < starts[:-1] + lengths[:-1]):
            raise self._fail("bnobt extents are unsorted or overlap")
        cnt_order = np.lexsort((cnt[:, 0], cnt[:, 1]))
        if np.any(cnt_order != np.arange(cnt.shape[0])):
            raise self._fail("cntbt records are not in (length, start) order")
        if cnt.shape != bno.shape or not np.array_equal(cnt[np.argsort(cnt[:, 0], kind="stable")], bno):
            raise self._fail("bnobt and cntbt list different free extents")
        total = int(lengths.sum())
        biggest = int(lengths.max()) if lengths.size else 0
        if total != freeblks or biggest != longest:
            raise self._fail(
                f"free-space trees hold {total} blocks (longest {biggest}); "
                f"the AGF counts {freeblks} (longest {longest})"
            )
        headers = -(-4 * sb.sector_size // sb.block_size)  # superblock, AGF, AGI, AGFL sectors
        if lengths.size and int(starts[0]) < headers:
            raise self._fail(f"a free extent starts at block {int(starts[0])}, inside the AG headers")
        if self.visited & set(agfl.tolist()):
            raise self._fail("a block is both on the free list and in a free-space tree")
        used = np.array(sorted(self.visited | set(agfl.tolist())), dtype=np.int64)
        at = np.searchsorted(starts, used, side="right") - 1
        inside = (at >= 0) & (used < starts[np.maximum(at, 0)] + lengths[np.maximum(at, 0)])
        if np.any(inside):
            raise self._fail(f"block {int(used[inside][0])} is both a tree/AGFL block and free")
        return AgFree(starts, lengths, agfl, freeblks, flcount, btreeblks)

    def _agfl(self, first: int, last: int, count: int) -> I64:
        sb = self.sb
        raw = self.volume.read(
            self._ag_byte(0) + 3 * sb.sector_size, sb.sector_size, f"AGFL of AG {self.agno}"
        )
        if sb.crc:
            magic, seqno = struct.unpack_from(">4sI", raw)
            if magic != b"XAFL" or seqno != self.agno or raw[8:24] != sb.meta_uuid:
                raise self._fail("AGFL header is invalid")
            if not verify_crc(raw, _AGFL_CRC_OFFSET):
                raise self._fail("AGFL fails its CRC32C")
            raw = raw[36:]
        slots = np.frombuffer(raw, dtype=">u4").astype(np.int64)
        size = slots.size
        if count > size or (count and (first >= size or last >= size)):
            raise self._fail(f"AGF free list [{first}, {last}] of {count} does not fit the AGFL")
        if count == 0:
            return np.empty(0, dtype=np.int64)
        if (last - first) % size + 1 != count:
            raise self._fail(f"AGF free list [{first}, {last}] does not hold {count} blocks")
        blocks = slots[(first + np.arange(count)) % size]
        headers = -(-4 * sb.sector_size // sb.block_size)
        if np.any(blocks >= self.length) or np.any(blocks < headers) or np.unique(blocks).size != count:
            raise self._fail("AGFL lists a block outside the AG or twice")
        return blocks

    def _walk(self, tree: _Tree) -> I64:
        """All leaf records of ``tree``, in tree order, as an ``n × 2`` array."""
        sb = self.sb
        bs = sb.block_size
        leaf_max = (bs - self.hdr) // 8
        node_max = (bs - self.hdr) // 12
        level_blocks = [tree.root]
        parent_keys: I64 | None = None
        for level in range(tree.levels - 1, -1, -1):
            if len(level_blocks) > self.length:
                raise self._fail(f"{tree.name} level {level} has more blocks than the AG")
            blocks = self._blocks(tree, level_blocks, level)
            headers = [struct.unpack_from(">4sHHII", b) for b in blocks]
            children: list[int] = []
            first_keys = []
            records = []
            for i, ((magic, lvl, numrecs, left, right), agbno) in enumerate(
                zip(headers, level_blocks, strict=True)
            ):
                want_left = level_blocks[i - 1] if i else NULL_AGBLOCK
                want_right = level_blocks[i + 1] if i + 1 < len(level_blocks) else NULL_AGBLOCK
                limit = node_max if level else leaf_max
                empty_root_leaf = level == 0 and tree.levels == 1 and numrecs == 0
                if (
                    magic != tree.magic
                    or lvl != level
                    or numrecs > limit
                    or (numrecs == 0 and not empty_root_leaf)
                ):
                    raise self._fail(
                        f"{tree.name} block {agbno} has a bad header (level {lvl}, {numrecs} records)"
                    )
                if left != want_left or right != want_right:
                    raise self._fail(f"{tree.name} block {agbno}: sibling pointers are inconsistent")
                block = blocks[i]
                keys = np.frombuffer(block, dtype=">u4", count=2 * numrecs, offset=self.hdr)
                pairs = keys.astype(np.int64).reshape(-1, 2)
                if pairs.shape[0]:
                    first_keys.append(pairs[0])
                if level:
                    ptrs = np.frombuffer(block, dtype=">u4", count=numrecs, offset=self.hdr + 8 * node_max)
                    children += ptrs.astype(np.int64).tolist()
                    records.append(pairs)
                else:
                    records.append(pairs)
            if parent_keys is not None:
                got = np.array(first_keys, dtype=np.int64).reshape(-1, 2)
                if got.shape != parent_keys.shape or not np.array_equal(got, parent_keys):
                    raise self._fail(f"{tree.name} level {level}: node keys do not match their children")
            merged = np.concatenate(records) if records else np.empty((0, 2), dtype=np.int64)
            self._check_order(tree, merged)
            if level == 0:
                return merged
            parent_keys = merged
            level_blocks = children
        raise AssertionError("unreachable: level 0 returns")

    def _check_order(self, tree: _Tree, rec: I64) -> None:
        """Keys strictly increase along a level: by start (bnobt), by (length, start) (cntbt)."""
        if rec.shape[0] < 2:
            return
        a, b = rec[:-1], rec[1:]
        if tree.name == "bnobt":
            ok = b[:, 0] > a[:, 0]
        else:
            ok = (b[:, 1] > a[:, 1]) | ((b[:, 1] == a[:, 1]) & (b[:, 0] > a[:, 0]))
        if not np.all(ok):
            raise self._fail(f"{tree.name} keys are out of order")

    def _blocks(self, tree: _Tree, agbnos: list[int], level: int) -> list[bytes]:
        sb = self.sb
        out = []
        for agbno in agbnos:
            if not -(-4 * sb.sector_size // sb.block_size) <= agbno < self.length:
                raise self._fail(f"{tree.name} points to block {agbno}, outside the AG")
            if agbno in self.visited:
                raise self._fail(f"{tree.name} reaches block {agbno} twice")
            self.visited.add(agbno)
            out.append(self.volume.read(self._ag_byte(agbno), sb.block_size, f"{tree.name} block {agbno}"))
        if sb.crc and out:
            self._check_v5(tree, agbnos, out)
        return out

    def _check_v5(self, tree: _Tree, agbnos: list[int], blocks: list[bytes]) -> None:
        sb = self.sb
        rows = np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(len(blocks), sb.block_size).copy()
        stored = rows[:, _BLOCK_CRC_OFFSET : _BLOCK_CRC_OFFSET + 4].copy().view("<u4").reshape(-1)
        rows[:, _BLOCK_CRC_OFFSET : _BLOCK_CRC_OFFSET + 4] = 0
        crcs = crc32c_rows(0xFFFFFFFF, rows) ^ np.uint32(0xFFFFFFFF)
        bad = np.flatnonzero(crcs != stored)
        if bad.size:
            raise self._fail(f"{tree.name} block {agbnos[int(bad[0])]} fails its CRC32C")
        for agbno, block in zip(agbnos, blocks, strict=True):
            (blkno,) = struct.unpack_from(">Q", block, 16)
            (owner,) = struct.unpack_from(">I", block, 48)
            daddr = (self.agno * sb.agblocks + agbno) * sb.bb_per_block
            if blkno != daddr or owner != self.agno or block[32:48] != sb.meta_uuid:
                raise self._fail(f"{tree.name} block {agbno}: its self-describing header is wrong")
