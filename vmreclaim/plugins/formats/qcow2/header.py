"""The qcow2 header, its extensions and its fixed-size tables, parsed and validated.

Everything here comes from an untrusted file. Each field is checked against the qcow2
specification (QEMU ``docs/interop/qcow2.rst``) and against QEMU's own limits
(``block/qcow2.h``) before anything is derived from it, and every failure names the
structure, the field and its offset in the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from vmreclaim.core.errors import CorruptImageError, UnsupportedImageError
from vmreclaim.core.formats import ImageFile

MAGIC = b"QFI\xfb"

# Masks and flags of table entries (qcow2.h).
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (1 << 5) - 1
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# QEMU's limits (qcow2.h): anything larger is refused, as QEMU refuses it.
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS
MAX_BACKING_NAME = 1023

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2
COMPRESSION_NAMES = {0: "deflate", 1: "zstd"}

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_SNAPSHOT = struct.Struct(">QIHHIIQII")
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")


@dataclass(frozen=True)
class Snapshot:
    """One internal snapshot: where its L1 table is and what it is called."""

    index: int
    l1_offset: int
    l1_size: int
    id: str
    name: str
    vm_state_size: int
    disk_size: int | None


@dataclass(frozen=True)
class Bitmap:
    """One persistent dirty bitmap: its table (offset, entries) and its name."""

    name: str
    table_offset: int
    table_size: int


@dataclass
class Header:
    """The validated header of a qcow2 image, with the extensions vmreclaim uses."""

    version: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    crypto_area: tuple[int, int] | None = None
    bitmaps_directory: tuple[int, int, int] | None = None  # (count, size, offset)
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DATA_FILE)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def feature_name(self, kind: int, bit: int) -> str:
        return self.feature_names.get((kind, bit), f"bit {bit}")


def parse_header(file: ImageFile) -> Header:
    """Read and validate the header cluster of ``file``."""
    where = f"{file.path}: qcow2 header"
    head = file.read(0, min(file.size, 112), "qcow2 header")
    if len(head) < _V2.size:
        raise CorruptImageError(f"{where} at 0x0 is truncated: {len(head)} of {_V2.size} bytes")
    (
        magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_offset,
        rt_offset,
        rt_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(head, 0)
    if magic != MAGIC:
        raise CorruptImageError(f"{where} at 0x0: magic {magic!r} is not {MAGIC!r}")
    if version not in (2, 3):
        raise UnsupportedImageError(f"{where} at 0x4: qcow2 version {version} is not supported (2 or 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImageError(
            f"{where} at 0x14: cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
        )
    h = Header(
        version,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_offset,
        rt_offset,
        rt_clusters,
        nb_snapshots,
        snapshots_offset,
    )
    cs = h.cluster_size
    if version == 3:
        if len(head) < 104:
            raise CorruptImageError(f"{where} at 0x0: version 3 header truncated at {len(head)} bytes")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length) = _V3.unpack_from(
            head, 72
        )
        if h.header_length < 104 or h.header_length % 8 or h.header_length > cs:
            raise CorruptImageError(
                f"{where} at 0x64: header_length {h.header_length} is not a multiple of 8 in 104..{cs}"
            )
        if h.header_length > 104:
            h.compression_type = head[104] if len(head) > 104 else 0
    if h.refcount_order > 6:
        raise CorruptImageError(f"{where} at 0x60: refcount_order {h.refcount_order} is above 6")
    if size >= 1 << 63:
        raise CorruptImageError(f"{where} at 0x18: virtual size {size} does not fit in 63 bits")

    cluster = file.read(0, min(file.size, cs), "qcow2 header cluster")
    _parse_extensions(h, cluster, file, backing_offset)
    _check_features(h, file.path)
    if backing_offset:
        if backing_size > MAX_BACKING_NAME or backing_offset + backing_size > cs:
            raise CorruptImageError(
                f"{where} at 0x8: backing file name at {backing_offset:#x} (+{backing_size}) lies "
                f"outside the header cluster or is longer than {MAX_BACKING_NAME} bytes"
            )
        if backing_offset + backing_size > len(cluster):
            raise CorruptImageError(
                f"{where}: backing file name at {backing_offset:#x} lies past end of file"
            )
        h.backing_file = os.fsdecode(cluster[backing_offset : backing_offset + backing_size])
        if not h.backing_file:
            h.backing_file = None
    _check_geometry(h, file)
    return h


def _parse_extensions(h: Header, cluster: bytes, file: ImageFile, backing_offset: int) -> None:
    """Walk the header extensions (type, length, data, padded to 8) up to the end marker."""
    end = backing_offset if backing_offset and backing_offset < len(cluster) else len(cluster)
    pos = h.header_length
    while pos + 8 <= end:
        ext_type, length = struct.unpack_from(">II", cluster, pos)
        if ext_type == EXT_END:
            return
        data_at = pos + 8
        if data_at + length > end:
            raise CorruptImageError(
                f"{file.path}: qcow2 header extension {ext_type:#010x} at {pos:#x} (+{length}) runs past "
                f"the header area (ends at {end:#x})"
            )
        data = cluster[data_at : data_at + length]
        if ext_type == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("ascii", "replace")
        elif ext_type == EXT_DATA_FILE:
            h.data_file = os.fsdecode(data)
        elif ext_type == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                kind, bit = data[i], data[i + 1]
                h.feature_names[(kind, bit)] = (
                    data[i + 2 : i + 48].split(b"\0", 1)[0].decode("ascii", "replace")
                )
        elif ext_type == EXT_CRYPTO:
            if length < 16:
                raise CorruptImageError(
                    f"{file.path}: qcow2 encryption header extension at {pos:#x} is {length} bytes, not 16"
                )
            h.crypto_area = struct.unpack_from(">QQ", data, 0)
        elif ext_type == EXT_BITMAPS:
            if length < 24:
                raise CorruptImageError(
                    f"{file.path}: qcow2 bitmaps header extension at {pos:#x} is {length} bytes, not 24"
                )
            count, _reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", data, 0)
            h.bitmaps_directory = (count, dir_size, dir_offset)
        # Unknown extensions carry nothing that changes where guest data lives.
        pos = data_at + ((length + 7) & ~7)


def _check_features(h: Header, path: Path) -> None:
    unknown = h.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        names = ", ".join(h.feature_name(0, b) for b in bits)
        raise UnsupportedImageError(
            f"{path}: qcow2 header at 0x48: unknown incompatible feature(s) {names} "
            f"(incompatible_features {h.incompatible:#x})"
        )
    if h.crypt_method == CRYPT_AES:
        raise UnsupportedImageError(f"{path}: qcow2 header at 0x20: legacy AES encryption is not supported")
    if h.crypt_method not in (CRYPT_NONE, CRYPT_LUKS):
        raise UnsupportedImageError(f"{path}: qcow2 header at 0x20: unknown crypt_method {h.crypt_method}")
    if h.crypt_method == CRYPT_LUKS and h.crypto_area is None:
        raise CorruptImageError(f"{path}: qcow2 LUKS-encrypted image has no encryption header extension")
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedImageError(
            f"{path}: qcow2 header at 0x68: unknown compression_type {h.compression_type}"
        )
    if bool(h.compression_type) != bool(h.incompatible & INCOMPAT_COMPRESSION):
        raise CorruptImageError(
            f"{path}: qcow2 header: compression_type {h.compression_type} disagrees with "
            f"incompatible feature bit 3"
        )
    if h.extended_l2 and h.cluster_bits < 14:
        raise CorruptImageError(f"{path}: qcow2 extended L2 entries need clusters of at least 16 KiB")
    if h.has_data_file and not h.data_file:
        raise UnsupportedImageError(
            f"{path}: qcow2 image uses an external data file but does not name it "
            "(QEMU needs a data-file option for it)"
        )
    if not h.has_data_file:
        h.data_file = None


def _check_geometry(h: Header, file: ImageFile) -> None:
    cs = h.cluster_size
    where = f"{file.path}: qcow2 header"
    span = cs * h.l2_entries  # guest bytes covered by one L1 entry
    needed = -(-h.size // span)
    if h.l1_size > MAX_L1_BYTES // 8:
        raise CorruptImageError(f"{where} at 0x24: active L1 table of {h.l1_size} entries is too large")
    if h.l1_size < needed:
        raise CorruptImageError(
            f"{where} at 0x24: L1 table of {h.l1_size} entries is too small for the "
            f"{h.size}-byte virtual disk ({needed} needed)"
        )
    check_table(file, "active L1 table", h.l1_offset, h.l1_size * 8, cs)
    if h.refcount_table_clusters == 0:
        raise CorruptImageError(f"{where} at 0x38: refcount table has no clusters")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise CorruptImageError(
            f"{where} at 0x38: refcount table of {h.refcount_table_clusters} clusters is too large"
        )
    check_table(file, "refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs, cs)
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImageError(f"{where} at 0x3c: {h.nb_snapshots} snapshots exceed QEMU's {MAX_SNAPSHOTS}")
    if h.nb_snapshots:
        check_table(file, "snapshot table", h.snapshots_offset, 0, cs)
    if h.has_data_file and h.nb_snapshots:
        raise CorruptImageError(f"{where}: an image with an external data file cannot have snapshots")


def check_table(file: ImageFile, what: str, offset: int, length: int, cluster_size: int) -> None:
    """A table must start on a cluster boundary and lie inside the file."""
    if offset % cluster_size:
        raise CorruptImageError(f"{file.path}: qcow2 {what} at {offset:#x} is not cluster aligned")
    if offset == 0 and length:
        raise CorruptImageError(f"{file.path}: qcow2 {what} at 0x0 overlaps the header")
    if offset + length > file.size:
        raise CorruptImageError(
            f"{file.path}: qcow2 {what} at {offset:#x} (+{length:#x}) lies past end of file "
            f"(size {file.size:#x})"
        )


def parse_snapshots(file: ImageFile, h: Header) -> tuple[list[Snapshot], int]:
    """The snapshot table; returns the snapshots and the table's length in bytes."""
    snaps: list[Snapshot] = []
    pos = h.snapshots_offset
    total = 0
    for i in range(h.nb_snapshots):
        raw = file.read(pos, _SNAPSHOT.size, f"snapshot table entry #{i}")
        (l1_offset, l1_size, id_size, name_size, _sec, _nsec, _clock, vm_state, extra) = _SNAPSHOT.unpack(raw)
        if extra > MAX_SNAPSHOT_EXTRA:
            raise CorruptImageError(
                f"{file.path}: qcow2 snapshot table entry #{i} at {pos:#x}: extra data of {extra} bytes "
                f"exceeds {MAX_SNAPSHOT_EXTRA}"
            )
        var = file.read(pos + _SNAPSHOT.size, extra + id_size + name_size, f"snapshot table entry #{i}")
        disk_size = struct.unpack_from(">Q", var, 8)[0] if extra >= 16 else None
        if extra >= 8:
            vm_state = max(vm_state, struct.unpack_from(">Q", var, 0)[0])
        ident = var[extra : extra + id_size].decode("utf-8", "replace")
        name = var[extra + id_size :].decode("utf-8", "replace")
        if l1_size > MAX_L1_BYTES // 8:
            raise CorruptImageError(
                f"{file.path}: qcow2 snapshot {name!r} (entry #{i} at {pos:#x}): L1 table of {l1_size} "
                "entries is too large"
            )
        check_table(file, f"L1 table of snapshot {name!r}", l1_offset, l1_size * 8, h.cluster_size)
        snaps.append(Snapshot(i, l1_offset, l1_size, ident, name, vm_state, disk_size))
        size = (_SNAPSHOT.size + extra + id_size + name_size + 7) & ~7
        pos += size
        total += size
        if total > MAX_SNAPSHOT_EXTRA * MAX_SNAPSHOTS:
            raise CorruptImageError(
                f"{file.path}: qcow2 snapshot table at {h.snapshots_offset:#x} is too large"
            )
    return snaps, total


def parse_bitmaps(file: ImageFile, h: Header) -> tuple[list[Bitmap], tuple[int, int] | None]:
    """The persistent bitmap directory: its bitmaps and its own (offset, length)."""
    if h.bitmaps_directory is None:
        return [], None
    count, size, offset = h.bitmaps_directory
    where = f"{file.path}: qcow2 bitmap directory at {offset:#x}"
    if count > MAX_BITMAPS or size > MAX_BITMAP_DIRECTORY_BYTES:
        raise CorruptImageError(f"{where}: {count} bitmaps in {size} bytes exceed QEMU's limits")
    if not count:
        return [], None
    check_table(file, "bitmap directory", offset, size, h.cluster_size)
    data = file.read(offset, size, "qcow2 bitmap directory")
    bitmaps: list[Bitmap] = []
    pos = 0
    for i in range(count):
        if pos + _BITMAP_ENTRY.size > size:
            raise CorruptImageError(
                f"{where}: entry #{i} at +{pos:#x} runs past the directory ({size} bytes)"
            )
        (table_offset, table_size, _flags, _type, _gran, name_size, extra) = _BITMAP_ENTRY.unpack_from(
            data, pos
        )
        entry_len = (_BITMAP_ENTRY.size + extra + name_size + 7) & ~7
        if pos + entry_len > size:
            raise CorruptImageError(
                f"{where}: entry #{i} at +{pos:#x} runs past the directory ({size} bytes)"
            )
        start = pos + _BITMAP_ENTRY.size + extra
        name = data[start : start + name_size].decode("utf-8", "replace")
        check_table(file, f"table of bitmap {name!r}", table_offset, table_size * 8, h.cluster_size)
        bitmaps.append(Bitmap(name, table_offset, table_size))
        pos += entry_len
    return bitmaps, (offset, size)
