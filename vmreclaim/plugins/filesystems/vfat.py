"""Driver ``vfat``: the free clusters of FAT12/16/32 from the file allocation table.

FAT has no bitmap and no checksums: a cluster is free when its entry in the allocation
table is zero. What the format offers to cross-check is redundancy, and all of it is
used before a cluster is called free:

* every copy of the table (usually two) must be byte-identical over the entries that
  describe clusters — copies that disagree mean an interrupted write or damage, and
  which one is right is ``fsck.fat``'s question, not ours;
* every allocated entry must point to a cluster that exists and is itself allocated
  (or end its chain): a chain that runs into a free entry means the free entry is a
  lie or the chain is, and either way a punch could hit live data;
* the directory tree is walked: every file's and directory's first cluster must be
  allocated, so (with the chain check) every cluster a reachable file holds is;
* the volume must be marked cleanly unmounted (the clean-shutdown bit of entry 1 on
  FAT16/32, the dirty bit Linux and Windows keep in the boot sector);
* the FAT type decided by the cluster count (as the specification does) must agree
  with the layout (FAT32's zero 16-bit table size), or the table would be read with the
  wrong entry width.

FAT32's FSInfo free count is only a hint, kept lazily by every implementation, so it is
not compared. Free ranges are whole clusters of the data region.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import CorruptImageError, UnsupportedImageError
from vmreclaim.core.filesystems import (
    Detection,
    FilesystemCapabilities,
    FilesystemReader,
    FreeSpace,
    ProgressCallback,
)
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.volumes import Volume

#: Cluster-count limits of the specification ("FAT Type Determination").
_FAT12_MAX_CLUSTERS = 4085
_FAT16_MAX_CLUSTERS = 65525


@dataclass(frozen=True)
class _Layout:
    bits: int
    sector: int
    cluster: int
    reserved: int
    fats: int
    fat_sectors: int
    data_start: int
    clusters: int
    total_bytes: int
    ext_flags: int
    root_cluster: int
    dirty_byte: int
    #: FAT12/16: the fixed root directory region (bytes from the volume start, length).
    root_start: int
    root_bytes: int


def _layout(boot: bytes, where: str) -> _Layout:
    (sector, spc, reserved, fats, root_entries, total16, _media, fat16_size) = struct.unpack_from(
        "<HBHBHHBH", boot, 0x0B
    )
    (total32,) = struct.unpack_from("<I", boot, 0x20)
    fat32_size, ext_flags, version, root_cluster = struct.unpack_from("<IHHI", boot, 0x24)
    if sector not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1):
        raise CorruptImageError(f"{where}: FAT boot sector: {sector}-byte sectors, {spc} per cluster")
    if reserved == 0 or fats == 0 or fats > 16:
        raise CorruptImageError(f"{where}: FAT boot sector: {reserved} reserved sectors, {fats} FATs")
    fat_sectors = fat16_size or fat32_size
    total = total16 or total32
    root_sectors = (root_entries * 32 + sector - 1) // sector
    data_start = reserved + fats * fat_sectors + root_sectors
    if fat_sectors == 0 or total <= data_start:
        raise CorruptImageError(
            f"{where}: FAT boot sector: {total} sectors cannot hold {data_start} sectors of "
            "reserved area, tables and root directory"
        )
    clusters = (total - data_start) // spc
    bits = 12 if clusters < _FAT12_MAX_CLUSTERS else 16 if clusters < _FAT16_MAX_CLUSTERS else 32
    if (bits == 32) != (fat16_size == 0):
        raise CorruptImageError(
            f"{where}: FAT boot sector: {clusters} clusters make this FAT{bits}, but the 16-bit "
            f"table size is {fat16_size}; the entry width is ambiguous"
        )
    if bits == 32 and (version != 0 or root_entries != 0 or root_cluster < 2):
        raise CorruptImageError(
            f"{where}: FAT32 boot sector: version {version:#x}, {root_entries} root entries, "
            f"root cluster {root_cluster}"
        )
    if fat_sectors * sector * 8 // bits < clusters + 2:
        raise CorruptImageError(
            f"{where}: FAT{bits}: a {fat_sectors}-sector table cannot describe {clusters} clusters"
        )
    return _Layout(
        bits,
        sector,
        sector * spc,
        reserved,
        fats,
        fat_sectors,
        data_start * sector,
        clusters,
        total * sector,
        ext_flags if bits == 32 else 0,
        root_cluster if bits == 32 else 0,
        boot[0x41 if bits == 32 else 0x25],
        (reserved + fats * fat_sectors) * sector,
        root_entries * 32,
    )


def _entries(table: bytes, bits: int, count: int) -> npt.NDArray[np.uint32]:
    """The first ``count`` entries of a table, as integers (FAT32's top 4 bits masked)."""
    if bits == 32:
        return np.frombuffer(table, dtype="<u4", count=count) & np.uint32(0x0FFFFFFF)
    if bits == 16:
        return np.frombuffer(table, dtype="<u2", count=count).astype(np.uint32)
    # FAT12: entries n and n+1 share three bytes; even entries take the low 12 bits.
    pairs = (count + 1) // 2
    padded = table[: pairs * 3].ljust(pairs * 3, b"\0")  # an odd count's last pair is half-used
    raw = np.frombuffer(padded, dtype=np.uint8).reshape(-1, 3).astype(np.uint32)
    even = raw[:, 0] | ((raw[:, 1] & 0x0F) << 8)
    odd = (raw[:, 1] >> 4) | (raw[:, 2] << 4)
    return np.column_stack([even, odd]).reshape(-1)[:count]


#: Directory entries more than this are refused (a loop or garbage, not a real tree).
MAX_DIRECTORY_ENTRIES = 4_000_000


def _chain(entries: npt.NDArray[np.uint32], first: int, lay: _Layout, where: str) -> list[int]:
    """The clusters of a directory's chain (links were range-checked by ``_check``)."""
    out: list[int] = []
    seen: set[int] = set()
    cluster = first
    while 2 <= cluster < entries.size:
        if cluster in seen:
            raise CorruptImageError(f"{where}: FAT{lay.bits}: a directory's cluster chain loops")
        seen.add(cluster)
        out.append(cluster)
        cluster = int(entries[cluster])
    return out


def _check_directories(volume: Volume, entries: npt.NDArray[np.uint32], lay: _Layout, where: str) -> None:
    """Walk the directory tree: every file's and directory's first cluster must be
    allocated. With every chain link already checked, this makes every cluster that a
    reachable file holds allocated — what ``fsck.fat`` checks, minus repairs."""
    if lay.bits == 32:
        pending: list[bytes | int] = [lay.root_cluster]
    else:
        pending = [volume.read(lay.root_start, lay.root_bytes, "FAT root directory")]
    visited: set[int] = set()
    seen_entries = 0
    while pending:
        item = pending.pop()
        if isinstance(item, int):
            if item in visited:
                raise CorruptImageError(f"{where}: FAT{lay.bits}: directory cluster {item} is reached twice")
            visited.add(item)
            clusters = _chain(entries, item, lay, where)
            data = b"".join(
                volume.read(lay.data_start + (c - 2) * lay.cluster, lay.cluster, "FAT directory")
                for c in clusters
            )
        else:
            data = item
        for pos in range(0, len(data) - 31, 32):
            name0, attr = data[pos], data[pos + 11]
            if name0 == 0:
                break  # end of directory
            if name0 == 0xE5 or attr & 0x0F == 0x0F or attr & 0x08:
                continue  # deleted, long-name piece, or volume label
            seen_entries += 1
            if seen_entries > MAX_DIRECTORY_ENTRIES:
                raise CorruptImageError(f"{where}: FAT{lay.bits}: more than {MAX_DIRECTORY_ENTRIES} entries")
            hi, lo = struct.unpack_from("<H", data, pos + 20)[0], struct.unpack_from("<H", data, pos + 26)[0]
            first = (hi << 16 | lo) if lay.bits == 32 else lo
            if data[pos : pos + 11] in (b".          ", b"..         "):
                continue
            if first == 0:
                continue  # an empty file
            if first < 2 or first >= entries.size or entries[first] == 0:
                name = data[pos : pos + 11].decode("ascii", "replace").strip()
                raise CorruptImageError(
                    f"{where}: FAT{lay.bits}: directory entry {name!r} starts at cluster {first}, "
                    "which the table marks free"
                )
            if attr & 0x10:
                pending.append(first)


class VfatReader(FilesystemReader):
    """FAT12/16/32, detected from its boot sector, read from its allocation tables."""

    capabilities: ClassVar[FilesystemCapabilities] = FilesystemCapabilities(free_space=True)

    def probe(self, volume: Volume) -> Detection | None:
        if volume.length < 512:
            return None
        boot = volume.read(0, 512, "fat boot sector")
        if boot[510:512] != b"\x55\xaa" or boot[3:11] == b"NTFS    ":
            return None
        fat32 = boot[0x52:0x5A] == b"FAT32   "
        if not fat32 and boot[0x36:0x3E] not in (b"FAT12   ", b"FAT16   ", b"FAT     "):
            return None
        bytes_per_sector, sectors_per_cluster = struct.unpack_from("<HB", boot, 0x0B)
        serial_at, label_at = (0x43, 0x47) if fat32 else (0x27, 0x2B)
        (serial,) = struct.unpack_from("<I", boot, serial_at)
        label = boot[label_at : label_at + 11].decode("ascii", "replace").strip()
        return Detection(
            "vfat",
            bytes_per_sector * sectors_per_cluster or None,
            "" if label == "NO NAME" else label,
            f"{serial >> 16:04X}-{serial & 0xFFFF:04X}",
        )

    def free_space(
        self,
        volume: Volume,
        detection: Detection,
        progress: ProgressCallback | None = None,
        *,
        estimate: bool = False,  # read as in a real run: nothing stale is relaxed here
    ) -> FreeSpace:
        where = f"{volume.image.file.path}: {volume.label}"
        lay = _layout(volume.read(0, 512, "fat boot sector"), where)
        if lay.total_bytes > volume.length:
            raise CorruptImageError(
                f"{where}: FAT{lay.bits} spans {lay.total_bytes} bytes but the volume holds {volume.length}"
            )
        if lay.ext_flags & 0x80:
            raise UnsupportedImageError(
                f"{where}: FAT32 table mirroring is disabled (only FAT {lay.ext_flags & 0xF} is "
                "active); the copies cannot be cross-checked"
            )
        if lay.dirty_byte & 0x01:
            raise CorruptImageError(f"{where}: FAT{lay.bits}: the boot sector marks the volume dirty")
        count = lay.clusters + 2
        table_bytes = lay.fat_sectors * lay.sector
        used_bytes = (count * lay.bits + 7) // 8
        first: bytes | None = None
        for i in range(lay.fats):
            table = volume.read(lay.reserved * lay.sector + i * table_bytes, used_bytes, f"FAT {i + 1}")
            if first is None:
                first = table
            elif self._differs(first, table, lay, count):
                raise CorruptImageError(f"{where}: FAT{lay.bits}: FAT {i + 1} differs from FAT 1")
            if progress is not None:
                progress(i + 1, lay.fats)
        assert first is not None
        entries = _entries(first, lay.bits, count)
        self._check(entries, lay, where)
        _check_directories(volume, entries, lay, where)
        free_idx = np.flatnonzero(entries[2:] == 0).astype(np.int64)
        starts = lay.data_start + free_idx * lay.cluster
        return FreeSpace(RangeSet(starts, starts + lay.cluster), lay.cluster, lay.total_bytes)

    @staticmethod
    def _differs(a: bytes, b: bytes, lay: _Layout, count: int) -> bool:
        if lay.bits != 32:
            return a != b
        # FAT32's top four bits of each entry are reserved and may differ between copies.
        return bool(np.any(_entries(a, 32, count) != _entries(b, 32, count)))

    @staticmethod
    def _check(entries: npt.NDArray[np.uint32], lay: _Layout, where: str) -> None:
        top = (1 << lay.bits) - 1 if lay.bits != 32 else 0x0FFFFFFF
        if lay.bits != 12:
            clean, no_errors = (0x8000, 0x4000) if lay.bits == 16 else (0x08000000, 0x04000000)
            if not int(entries[1]) & clean:
                raise CorruptImageError(f"{where}: FAT{lay.bits}: the volume was not cleanly unmounted")
            if not int(entries[1]) & no_errors:
                raise CorruptImageError(f"{where}: FAT{lay.bits}: the volume recorded disk errors")
        body = entries[2:]
        bad = top - 8  # 0xFF7 / 0xFFF7 / 0x0FFFFFF7
        reserved_lo = top - 15  # 0xFF0.. values below "bad" are reserved (never written)
        links = (body != 0) & (body < reserved_lo)
        if np.any((body >= reserved_lo) & (body < bad)):
            raise CorruptImageError(f"{where}: FAT{lay.bits}: entries hold reserved values")
        targets = body[links].astype(np.int64)
        if targets.size and (int(targets.min()) < 2 or int(targets.max()) >= entries.size):
            raise CorruptImageError(f"{where}: FAT{lay.bits}: a cluster chain points outside the volume")
        if targets.size and np.any(entries[targets] == 0):
            raise CorruptImageError(f"{where}: FAT{lay.bits}: a cluster chain runs into a free cluster")
        if lay.root_cluster and (lay.root_cluster >= entries.size or entries[lay.root_cluster] == 0):
            raise CorruptImageError(
                f"{where}: FAT32: root directory cluster {lay.root_cluster} is marked free"
            )
