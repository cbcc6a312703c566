"""Volumes of a virtual disk: the byte ranges that may each hold one filesystem.

An offline reader (``image sparsify``) first has to know where the guest's filesystems
start. :func:`scan_volumes` reads the partition table through the format driver and
returns one :class:`Volume` per partition, or one for the whole disk when there is no
table:

* **GPT** — the primary header at LBA 1 (512- or 4096-byte sectors) behind a protective
  MBR, header and entry array CRC32-checked; the backup header at the last LBA when the
  primary is damaged.
* **MBR** — the four primary slots and the chain of extended boot records (logical
  partitions numbered from 5, as Linux does), the chain bounded and checked for loops.
* **whole disk** — no valid table, or a boot-sector filesystem (FAT, NTFS) at sector 0
  whose boot code would otherwise be misread as partition entries.

LVM2 physical volumes are recognised by their label; their linear logical volumes are
read from the checksummed text metadata (:mod:`vmreclaim.core.lvm`) and listed right
after the PV, each as a volume of its own (scheme ``lvm``); other LVs are listed with
the reason they are skipped. The well-kept library candidate, ``dissect.volume``, reads
only the first metadata slot without checking the mda header or metadata checksums or
the ring buffer's wrap-around, and is AGPL-3.0 (this project is Apache-2.0), so the
metadata reader is our own.

Every number comes from the image and is untrusted: a partition that reaches past the
end of the disk is skipped with the reason; two partitions that overlap, or a chain
that loops, make the whole table unusable (:class:`CorruptImageError`, nothing punched),
because a block free in one filesystem may then be in use by another.
"""

from __future__ import annotations

import itertools
import struct
import uuid
import zlib
from dataclasses import dataclass, field

from vmreclaim.core import lvm
from vmreclaim.core.errors import CorruptImageError
from vmreclaim.core.formats import MAX_STRUCTURE_READ, Image

SECTOR = 512
#: A logical partition chain longer than this is treated as a loop (Linux stops at 256
#: partitions per disk; no real table comes close).
MAX_LOGICAL_PARTITIONS = 256
#: GPT entry arrays larger than this are refused (the usual one is 16 KiB).
MAX_GPT_ENTRIES_BYTES = 4 * 1024 * 1024

_MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
_MBR_PROTECTIVE = 0xEE
_LVM_LABEL_SECTORS = 4


@dataclass
class Volume:
    """A contiguous byte range ``[start, start + length)`` of the virtual disk.

    ``number`` is the partition number as Linux names it (``vda5`` → 5), ``None`` for
    the whole disk. A volume with a ``skip_reason`` is listed but never read further.
    """

    image: Image = field(repr=False, compare=False)
    start: int
    length: int
    number: int | None = None
    scheme: str = "none"
    #: MBR type byte (``"0x83"``) or GPT partition type GUID; empty for the whole disk.
    type_id: str = ""
    name: str = ""
    #: What the scan found in place of a filesystem (``"LVM2_member"``), if anything.
    content: str | None = None
    skip_reason: str | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def label(self) -> str:
        """How messages name the volume: ``partition 2``, ``LV vg/root`` or ``whole disk``."""
        if self.scheme == "lvm":
            return f"LV {self.name}"
        return "whole disk" if self.number is None else f"partition {self.number}"

    def read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at ``offset`` inside the volume; ``what`` names the structure.

        Reads outside the volume are refused with a :class:`CorruptImageError` that
        names the structure, the offset and the volume: a filesystem's own numbers
        must never make us read (and later punch) beyond its partition.
        """
        if offset < 0 or length < 0 or length > MAX_STRUCTURE_READ:
            raise CorruptImageError(
                f"{self.image.file.path}: {self.label}: {what} at {offset:#x} has an impossible "
                f"length {length}"
            )
        if offset + length > self.length:
            raise CorruptImageError(
                f"{self.image.file.path}: {self.label}: {what} at {offset:#x} (+{length:#x}) lies "
                f"past the end of the volume ({self.length:#x} bytes)"
            )
        return self.image.read(self.start + offset, length)


def scan_volumes(image: Image) -> list[Volume]:
    """The volumes of ``image``'s virtual disk, in disk order, LVM2 members marked."""
    size = image.virtual_size
    if size < SECTOR:
        return [Volume(image, 0, size, skip_reason="disk smaller than one sector")]
    head = image.read(0, min(size, 2 * 4096))
    volumes = _read_table(image, head, size)
    for vol in volumes:
        if vol.skip_reason is None:
            _mark_lvm(vol)
    _check_overlaps(image, volumes)
    out: list[Volume] = []
    for vol in volumes:
        out.append(vol)
        if vol.content == "LVM2_member":
            out += _logical_volumes(vol)
    return out


def _logical_volumes(pv: Volume) -> list[Volume]:
    """The PV's logical volumes as volumes of the disk; the PV itself is then skipped."""
    try:
        found = lvm.logical_volumes(pv.read, pv.length)
    except (lvm.MetadataError, CorruptImageError) as exc:
        pv.skip_reason = f"LVM2 physical volume: {exc}; its logical volumes are not read"
        return []
    pv.skip_reason = "LVM2 physical volume: its logical volumes are listed after it"
    return [
        Volume(
            pv.image,
            pv.start + lv.offset,
            lv.length,
            scheme="lvm",
            type_id="linear",
            name=lv.name,
            skip_reason=lv.skip_reason,
        )
        for lv in found
    ]


# -- table selection ---------------------------------------------------------------------


def _read_table(image: Image, head: bytes, size: int) -> list[Volume]:
    whole = [Volume(image, 0, size)]
    if head[510:512] != b"\x55\xaa" or _is_boot_sector_filesystem(head):
        return whole
    entries = _mbr_entries(head[:SECTOR])
    if entries is None:
        return whole
    if any(e.type == _MBR_PROTECTIVE for e in entries):
        problems: list[str] = []
        for sector in (SECTOR, 4096):
            found = _read_gpt(image, size, sector, problems)
            if found is not None:
                return found
        raise CorruptImageError(
            f"{image.file.path}: protective MBR (type 0xee) but no valid GPT header"
            + (f": {'; '.join(problems)}" if problems else " (no 'EFI PART' signature)")
        )
    return _read_mbr(image, entries, size)


def _is_boot_sector_filesystem(head: bytes) -> bool:
    """FAT and NTFS put a boot sector (with 0x55AA) at sector 0 of a partitionless disk."""
    return (
        head[3:11] == b"NTFS    "
        or head[0x36:0x3E] in (b"FAT12   ", b"FAT16   ", b"FAT     ")
        or head[0x52:0x5A] == b"FAT32   "
    )


# -- MBR -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MBREntry:
    slot: int
    boot: int
    type: int
    lba: int
    sectors: int


def _mbr_entries(sector: bytes) -> list[_MBREntry] | None:
    """The non-empty entries of an MBR/EBR sector, or ``None`` if they are not a table
    (boot flags other than 0x00/0x80 mean boot code, not partition entries)."""
    found = []
    for slot in range(4):
        boot, ptype, lba, sectors = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * slot)
        if boot not in (0x00, 0x80):
            return None
        if ptype == 0 or sectors == 0:
            continue
        found.append(_MBREntry(slot, boot, ptype, lba, sectors))
    return found


def _read_mbr(image: Image, entries: list[_MBREntry], size: int) -> list[Volume]:
    volumes: list[Volume] = []
    extended = [e for e in entries if e.type in _MBR_EXTENDED_TYPES]
    if len(extended) > 1:
        raise CorruptImageError(f"{image.file.path}: MBR has {len(extended)} extended partitions")
    for e in entries:
        if e.type in _MBR_EXTENDED_TYPES:
            continue
        volumes.append(
            _partition(image, e.lba * SECTOR, e.sectors * SECTOR, e.slot + 1, "mbr", f"{e.type:#04x}", size)
        )
    if extended:
        volumes += _read_logical(image, extended[0], size)
    if not volumes and not extended:
        return [Volume(image, 0, size)]
    return sorted(volumes, key=lambda v: v.start)


def _read_logical(image: Image, ext: _MBREntry, size: int) -> list[Volume]:
    """Follow the chain of extended boot records inside the extended partition."""
    where = image.file.path
    ext_start, ext_end = ext.lba * SECTOR, (ext.lba + ext.sectors) * SECTOR
    if ext_end > size:
        raise CorruptImageError(
            f"{where}: extended partition [{ext_start}, {ext_end}) lies past the end of the {size}-byte disk"
        )
    volumes: list[Volume] = []
    seen: set[int] = set()
    ebr = ext_start
    number = 5
    while True:
        if ebr in seen:
            raise CorruptImageError(f"{where}: extended boot record chain loops back to byte {ebr}")
        if len(seen) >= MAX_LOGICAL_PARTITIONS:
            raise CorruptImageError(f"{where}: more than {MAX_LOGICAL_PARTITIONS} logical partitions")
        if not ext_start <= ebr < ext_end or ebr + SECTOR > ext_end:
            raise CorruptImageError(
                f"{where}: extended boot record at byte {ebr} lies outside the extended "
                f"partition [{ext_start}, {ext_end})"
            )
        seen.add(ebr)
        sector = image.read(ebr, SECTOR)
        if sector[510:512] != b"\x55\xaa":
            raise CorruptImageError(f"{where}: extended boot record at byte {ebr} has no 0x55AA signature")
        entries = _mbr_entries(sector)
        if entries is None:
            raise CorruptImageError(f"{where}: extended boot record at byte {ebr} has invalid entries")
        data = [e for e in entries if e.type not in _MBR_EXTENDED_TYPES]
        links = [e for e in entries if e.type in _MBR_EXTENDED_TYPES]
        if len(data) > 1 or len(links) > 1:
            raise CorruptImageError(
                f"{where}: extended boot record at byte {ebr} holds {len(data)} partitions and "
                f"{len(links)} links (at most one of each)"
            )
        for e in data:
            start = ebr + e.lba * SECTOR
            vol = _partition(image, start, e.sectors * SECTOR, number, "mbr", f"{e.type:#04x}", size)
            if vol.skip_reason is None and vol.end > ext_end:
                vol.skip_reason = f"logical partition reaches past its extended partition (byte {ext_end})"
            volumes.append(vol)
            number += 1
        if not links:
            return volumes
        ebr = ext_start + links[0].lba * SECTOR


def _partition(
    image: Image, start: int, length: int, number: int, scheme: str, type_id: str, size: int, name: str = ""
) -> Volume:
    vol = Volume(image, start, length, number=number, scheme=scheme, type_id=type_id, name=name)
    if start + length > size:
        vol.skip_reason = (
            f"partition [{start}, {start + length}) reaches past the end of the {size}-byte disk"
        )
    return vol


# -- GPT -----------------------------------------------------------------------------------

_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")


class _InvalidGPT(Exception):
    """One GPT copy (header or entry array) failed a check; the other copy may not."""


def _read_gpt(image: Image, size: int, sector: int, problems: list[str]) -> list[Volume] | None:
    """Partitions from the primary GPT, else from the backup (as Linux does when the
    primary header or its entry array is damaged); ``None`` if neither is valid, with
    the reasons appended to ``problems``."""
    last_lba = size // sector - 1
    for lba in (1, last_lba):
        if lba < 1 or (lba + 1) * sector > size:
            continue
        hdr = image.read(lba * sector, sector)
        if hdr[:8] != b"EFI PART":
            continue
        try:
            return _parse_gpt(image, hdr, lba, size, sector)
        except _InvalidGPT as exc:
            problems.append(f"GPT at LBA {lba} ({sector}-byte sectors): {exc}")
    return None


def _parse_gpt(image: Image, hdr: bytes, lba: int, size: int, sector: int) -> list[Volume]:
    (
        _sig,
        _rev,
        hsize,
        hcrc,
        _res,
        my_lba,
        _alt,
        first_use,
        last_use,
        _guid,
        entries_lba,
        count,
        esize,
        ecrc,
    ) = _GPT_HEADER.unpack_from(hdr)
    if not 92 <= hsize <= sector:
        raise _InvalidGPT(f"header size {hsize} is not between 92 and {sector}")
    check = bytearray(hdr[:hsize])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != hcrc:
        raise _InvalidGPT("header fails its CRC32")
    if my_lba != lba:
        raise _InvalidGPT(f"header says it lives at LBA {my_lba}")
    if esize < 128 or esize % 8 or count * esize > MAX_GPT_ENTRIES_BYTES:
        raise _InvalidGPT(f"{count} entries of {esize} bytes is not a valid entry array")
    table_len = count * esize
    if entries_lba * sector + table_len > size:
        raise _InvalidGPT(f"entry array at LBA {entries_lba} lies past the end of the disk")
    table = image.read(entries_lba * sector, table_len)
    if zlib.crc32(table) != ecrc:
        raise _InvalidGPT(f"entry array at LBA {entries_lba} fails its CRC32")
    where = image.file.path
    volumes = []
    for i in range(count):
        raw = table[i * esize : (i + 1) * esize]
        ptype = raw[:16]
        if ptype == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", raw, 32)
        name = raw[56:128].decode("utf-16-le", errors="replace").split("\x00", 1)[0]
        type_guid = str(uuid.UUID(bytes_le=ptype))
        if last < first:
            raise CorruptImageError(
                f"{where}: GPT entry {i + 1} ends (LBA {last}) before it starts (LBA {first})"
            )
        vol = _partition(
            image, first * sector, (last - first + 1) * sector, i + 1, "gpt", type_guid, size, name
        )
        if vol.skip_reason is None and not first_use <= first <= last <= last_use:
            vol.skip_reason = f"GPT entry lies outside the usable LBAs [{first_use}, {last_use}]"
        volumes.append(vol)
    return sorted(volumes, key=lambda v: v.start)


# -- checks ---------------------------------------------------------------------------------


def _mark_lvm(vol: Volume) -> None:
    """Mark an LVM2 physical volume (its label sits in one of its first four sectors)."""
    n = min(_LVM_LABEL_SECTORS * SECTOR, vol.length)
    head = vol.read(0, n - n % SECTOR, "LVM2 label area") if n >= SECTOR else b""
    for i in range(len(head) // SECTOR):
        label = head[i * SECTOR : (i + 1) * SECTOR]
        if label[:8] == b"LABELONE" and label[24:32] == b"LVM2 001":
            (pv_offset,) = struct.unpack_from("<I", label, 20)
            pv_uuid = (
                label[pv_offset : pv_offset + 32].decode("ascii", "replace")
                if pv_offset < SECTOR - 32
                else ""
            )
            vol.content = "LVM2_member"
            vol.name = vol.name or pv_uuid
            return


def _check_overlaps(image: Image, volumes: list[Volume]) -> None:
    ordered = sorted((v for v in volumes if v.length), key=lambda v: v.start)
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            raise CorruptImageError(
                f"{image.file.path}: {a.label} [{a.start}, {a.end}) and {b.label} "
                f"[{b.start}, {b.end}) overlap; refusing to read either"
            )
