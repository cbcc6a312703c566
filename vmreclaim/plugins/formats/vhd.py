"""The VHD format (Microsoft Virtual Hard Disk 1.0; QEMU calls it ``vpc``).

Three kinds of disk share one 512-byte footer (``conectix``, big-endian, checksummed):

* **fixed** — the guest bytes, then the footer: guest byte ``g`` is host byte ``g``;
* **dynamic** — a copy of the footer at offset 0, a dynamic header (``cxsparse``), a
  Block Allocation Table of 32-bit sector numbers, and blocks of ``block_size`` bytes
  appended as they are first written, each preceded by a sector bitmap;
* **differencing** — a dynamic disk whose clear bitmap bits (and unallocated blocks)
  are read from a parent VHD, found through the parent locators.

A sector whose bitmap bit is clear is ``unallocated``: in a dynamic disk it reads as
zeros, in a differencing disk it comes from the parent (which is never written). Bits
are MSB first (sector 0 is bit 7 of byte 0), as Virtual PC, Hyper-V and Xen's blktap
write them. VHD has no sharing, no compression and no zero flag, so every set bit of an
allocated block is ``data``.

The virtual size follows QEMU's rule (``vpc_open``): the CHS geometry for images made
by Virtual PC and old QEMU, the footer's current size for Hyper-V, disk2vhd, XenServer,
XenConverter and QEMU's ``force_size`` images, and whenever the geometry is the maximum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import (
    CorruptImageError,
    DriverError,
    ImageError,
    UnsupportedImageError,
    UsageError,
)
from vmreclaim.core.extents import NO_OFFSET, ExtentKind, ExtentMap, trim_to_window
from vmreclaim.core.formats import (
    FormatCapabilities,
    Image,
    ImageFile,
    ImageFormat,
    ImageOpener,
    first_overlap,
)
from vmreclaim.core.ranges import ByteRange, RangeSet

SECTOR = 512
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
TYPE_NAMES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}
UNUSED = 0xFFFFFFFF
#: QEMU's limits (block/vpc.c): 2040 GiB, and the largest CHS geometry.
MAX_SECTORS = 0xFF000000
MAX_GEOMETRY = 65535 * 16 * 255
#: Creators whose images are sized by the footer's current size, not by CHS.
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
#: Largest block size accepted: QEMU accepts any power of two; real writers use
#: 512 KiB or 2 MiB, and a bound keeps a hostile header from asking for huge bitmaps.
MAX_BLOCK_SIZE = 256 * 1024 * 1024

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_HEADER = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">IIIIQ")
#: Parent locator platform codes.
W2RU, W2KU, MACX = 0x57327275, 0x57326B75, 0x4D616358

#: Allocated blocks whose bitmaps are read and decoded per batch.
_BATCH_BLOCKS = 32768


def checksum(buf: bytes, field_at: int) -> int:
    """One's complement of the byte sum, the 4-byte checksum field counted as zero."""
    total = sum(buf) - sum(buf[field_at : field_at + 4])
    return ~total & 0xFFFFFFFF


@dataclass(frozen=True)
class Footer:
    """The validated hard disk footer."""

    offset: int  # where in the file this copy was read
    features: int
    data_offset: int
    creator: bytes
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    unique_id: bytes
    saved_state: bool

    @property
    def virtual_size(self) -> int:
        """The guest-visible size, computed as QEMU computes it."""
        chs = self.cylinders * self.heads * self.sectors
        if self.creator in CURRENT_SIZE_CREATORS or chs == MAX_GEOMETRY:
            return (self.current_size // SECTOR) * SECTOR
        return chs * SECTOR


def parse_footer(raw: bytes, offset: int, path: Path) -> Footer:
    """Decode and validate a 512-byte footer read at ``offset``."""
    (cookie, features, _version, data_offset, _time, creator, _cver, _cos, _orig, current, cyl, heads,
     secs, disk_type, stored, uid, saved, _rest) = _FOOTER.unpack(raw)  # fmt: skip
    if cookie != FOOTER_COOKIE:
        raise CorruptImageError(
            f"{path}: VHD footer at {offset:#x}: cookie {cookie!r} is not {FOOTER_COOKIE!r}"
        )
    computed = checksum(raw, 64)
    if stored != computed:
        raise CorruptImageError(
            f"{path}: VHD footer at {offset:#x}: checksum {stored:#010x} does not match the contents "
            f"({computed:#010x})"
        )
    if disk_type not in TYPE_NAMES:
        raise UnsupportedImageError(
            f"{path}: VHD footer at {offset:#x}: disk type {disk_type} is not supported"
        )
    footer = Footer(
        offset, features, data_offset, creator, current, cyl, heads, secs, disk_type, uid, saved != 0
    )
    if footer.virtual_size > MAX_SECTORS * SECTOR:
        raise UnsupportedImageError(
            f"{path}: VHD footer at {offset:#x}: virtual size {footer.virtual_size} exceeds the 2040 GiB "
            "limit of the format"
        )
    return footer


def _read_footers(file: ImageFile) -> tuple[Footer, bool]:
    """The footer to trust and whether the copy at the end of the file is intact.

    The copy at the end is authoritative (a guest of a fixed disk can write anything
    at offset 0, never past its disk). A dynamic disk also keeps a copy at offset 0;
    when the end copy is damaged (a writer stopped while growing the file) that copy
    is used and the image is not punchable.
    """
    if file.size < SECTOR:
        raise CorruptImageError(f"{file.path}: VHD file of {file.size} bytes is too small for a footer")
    end_error: CorruptImageError | None = None
    tail = file.read(file.size - SECTOR, SECTOR, "VHD footer")
    try:
        end = parse_footer(tail, file.size - SECTOR, file.path)
        if end.disk_type == FIXED:
            return end, True
    except CorruptImageError as exc:
        end, end_error = None, exc
    head = file.read(0, SECTOR, "VHD footer copy")
    if head[:8] != FOOTER_COOKIE:
        if end_error is not None:
            raise end_error
        raise CorruptImageError(f"{file.path}: VHD footer copy at 0x0 is missing for a dynamic disk")
    first = parse_footer(head, 0, file.path)
    if first.disk_type == FIXED:
        raise CorruptImageError(
            f"{file.path}: VHD footer copy at 0x0 says fixed, but no fixed footer ends the file"
        )
    return first, end is not None


@dataclass(frozen=True)
class Locator:
    platform: int
    space: int  # bytes reserved for the locator data
    length: int
    offset: int


@dataclass(frozen=True)
class DynamicHeader:
    offset: int
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_id: bytes
    parent_name: str
    locators: tuple[Locator, ...]


def parse_dynamic_header(file: ImageFile, offset: int, footer: Footer) -> DynamicHeader:
    where = f"{file.path}: VHD dynamic header at {offset:#x}"
    if offset % SECTOR:
        raise CorruptImageError(f"{where} is not sector aligned")
    raw = file.read(offset, 1024, "VHD dynamic header")
    (cookie, _data, table, _version, entries, block, stored, parent_id, _ptime, _res,
     pname) = _HEADER.unpack_from(raw, 0)  # fmt: skip
    if cookie != HEADER_COOKIE:
        raise CorruptImageError(f"{where}: cookie {cookie!r} is not {HEADER_COOKIE!r}")
    computed = checksum(raw, 36)
    if stored != computed:
        raise CorruptImageError(
            f"{where}: checksum {stored:#010x} does not match the contents ({computed:#010x})"
        )
    if block < SECTOR or block & (block - 1) or block > MAX_BLOCK_SIZE:
        raise CorruptImageError(f"{where}: block size {block} is not a power of two in 512..{MAX_BLOCK_SIZE}")
    if entries * block < footer.virtual_size:
        raise CorruptImageError(
            f"{where}: {entries} BAT entries of {block}-byte blocks cannot hold the "
            f"{footer.virtual_size}-byte disk"
        )
    if entries > MAX_SECTORS * SECTOR // block + 1:
        raise CorruptImageError(f"{where}: {entries} BAT entries exceed the format's limit")
    if table % SECTOR:
        raise CorruptImageError(f"{where}: BAT offset {table:#x} is not sector aligned")
    locators = []
    for i in range(8):
        platform, space, length, _r, loc_off = _LOCATOR.unpack_from(raw, 576 + 24 * i)
        if platform == 0:
            continue
        # The spec counts the space in sectors; some writers put bytes there.
        space_bytes = space if space >= SECTOR and space % SECTOR == 0 else space * SECTOR
        size = max(space_bytes, -(-length // SECTOR) * SECTOR)
        if loc_off % SECTOR or loc_off + size > file.size or size > 1 << 20:
            raise CorruptImageError(
                f"{where}: parent locator #{i} at {loc_off:#x} (+{size:#x}) is unaligned, too large or past "
                f"end of file (size {file.size:#x})"
            )
        locators.append(Locator(platform, size, length, loc_off))
    name = pname.decode("utf-16-be", "replace").split("\0", 1)[0]
    return DynamicHeader(offset, table, entries, block, parent_id, name, tuple(locators))


class VhdImage(Image):
    """A parsed VHD: fixed, dynamic or differencing."""

    def __init__(
        self, file: ImageFile, footer: Footer, footer_intact: bool, header: DynamicHeader | None
    ) -> None:
        super().__init__(file, "vhd")
        self.footer = footer
        self.footer_intact = footer_intact
        self.header = header
        self._size = footer.virtual_size
        self._bat = np.zeros(0, dtype=np.int64)
        self._bitmap_bytes = 0
        if header is None:
            if self._size > file.size - SECTOR:
                raise CorruptImageError(
                    f"{file.path}: fixed VHD of {self._size} bytes does not fit in a {file.size}-byte file"
                )
            return
        block = header.block_size
        self._bitmap_bytes = -(-(block // SECTOR) // 8 // SECTOR) * SECTOR
        self._bitmap_bytes = max(SECTOR, self._bitmap_bytes)
        self._bat = self._read_bat()

    # -- layout --------------------------------------------------------------------------------

    def _read_bat(self) -> npt.NDArray[np.int64]:
        """The BAT as int64 byte offsets of each block's bitmap (-1: not allocated)."""
        h = self.header
        assert h is not None
        raw = self.file.read_array(h.table_offset, h.max_table_entries, ">u4", "VHD block allocation table")
        bat = np.where(raw == UNUSED, -1, raw.astype(np.int64) * SECTOR)
        used = np.flatnonzero(bat >= 0)
        span = self._bitmap_bytes + h.block_size
        where = f"{self.file.path}: VHD block allocation table at {h.table_offset:#x}"
        if used.size:
            ends = bat[used] + span
            past = ends > self.file.size
            if bool(past.any()):
                i = int(used[int(np.argmax(past))])
                raise CorruptImageError(
                    f"{where}: block {i} at {int(bat[i]):#x} (+{span:#x}) lies past end of file (size "
                    f"{self.file.size:#x})"
                )
            clash = first_overlap(bat[used], np.full(used.size, span, dtype=np.int64))
            if clash is not None:
                a, b = int(used[clash[0]]), int(used[clash[1]])
                raise CorruptImageError(
                    f"{where}: block {b} at {int(bat[b]):#x} overlaps block {a} at {int(bat[a]):#x}"
                )
        return bat

    def _structures(self) -> tuple[list[str], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Every VHD structure except block bitmaps: names, starts, lengths."""
        names = ["footer"]
        starts = [self.file.size - SECTOR]
        lengths = [SECTOR]
        h = self.header
        if h is not None:
            names += ["footer copy", "dynamic header", "block allocation table"]
            starts += [0, h.offset, h.table_offset]
            lengths += [SECTOR, 1024, -(-(h.max_table_entries * 4) // SECTOR) * SECTOR]
            for i, loc in enumerate(h.locators):
                names.append(f"parent locator #{i}")
                starts.append(loc.offset)
                lengths.append(loc.space)
        return names, np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.int64)

    # -- the Image contract ----------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def cluster_size(self) -> int:
        if self.header is None:
            from vmreclaim.core.punch import host_block_size  # ctypes: only when asked

            return host_block_size(self.file.fd)  # a fixed disk allocates like a raw file
        return self.header.block_size

    def refresh(self) -> None:
        self.file.refresh_size()
        if self.header is not None:
            self._bat = self._read_bat()

    def check_punchable(self) -> None:
        if self.footer.saved_state:
            raise UnsupportedImageError(
                f"{self.file.path}: VHD footer at {self.footer.offset:#x} says the VM's state is saved in it "
                "(saved state); such an image must not be modified"
            )
        if not self.footer_intact:
            raise CorruptImageError(
                f"{self.file.path}: VHD footer at the end of the file is missing or damaged (the writer did "
                "not finish growing the file); refusing to punch"
            )
        self.metadata_ranges()  # validates that no structure overlaps another

    def metadata_ranges(self) -> RangeSet:
        names, starts, lengths = self._structures()
        used = self._bat[self._bat >= 0]
        span = (self.header.block_size + self._bitmap_bytes) if self.header is not None else 0
        # No structure may overlap another or any block (its bitmap and its data).
        s = np.concatenate([starts, used])
        n = np.concatenate([lengths, np.full(used.size, span, dtype=np.int64)])
        clash = first_overlap(s, n)
        if clash is not None:

            def name(k: int) -> str:
                if k < len(names):
                    return f"{names[k]} at {int(s[k]):#x}"
                return f"block {int(np.flatnonzero(self._bat == s[k])[0])} at {int(s[k]):#x}"

            raise CorruptImageError(f"{self.file.path}: VHD {name(clash[1])} overlaps the {name(clash[0])}")
        bitmaps = np.full(used.size, self._bitmap_bytes, dtype=np.int64)
        all_starts = np.concatenate([starts, used])
        return RangeSet(all_starts, all_starts + np.concatenate([lengths, bitmaps]))

    def map(self, window: ByteRange) -> ExtentMap:
        if window.end > self._size:
            raise UsageError(f"map window {window} lies outside the {self._size}-byte virtual disk")
        if not window.length:
            return ExtentMap.empty()
        if self.header is None:
            return self._map_fixed(window)
        block = self.header.block_size
        first, last = window.start // block, (window.end - 1) // block
        blocks = np.arange(first, last + 1, dtype=np.int64)
        offs = self._bat[blocks]
        pieces: list[ExtentMap] = []
        absent = blocks[offs < 0]
        if absent.size:
            n = absent.size
            pieces.append(ExtentMap(absent * block, np.full(n, block, dtype=np.int64),
                                    np.full(n, ExtentKind.UNALLOCATED, dtype=np.uint8),
                                    np.full(n, NO_OFFSET, dtype=np.int64)))  # fmt: skip
        present = blocks[offs >= 0]
        for b in range(0, present.size, _BATCH_BLOCKS):
            pieces.append(self._map_blocks(present[b : b + _BATCH_BLOCKS]))
        result = ExtentMap.concat(pieces)
        order = np.argsort(result.starts, kind="stable")
        result = ExtentMap(
            result.starts[order], result.lengths[order], result.kinds[order], result.offsets[order]
        )
        result = trim_to_window(result.merged(), window)
        result.require_covers(window, f"{self.file.path}: VHD map")
        return result

    def _map_fixed(self, window: ByteRange) -> ExtentMap:
        # Every guest byte of a fixed disk is stored at the same host offset. Holes in a
        # sparse file still map as data (as QEMU reports them): punching one frees nothing.
        return ExtentMap.single(window.start, window.length, ExtentKind.DATA, window.start)

    def _map_blocks(self, blocks: npt.NDArray[np.int64]) -> ExtentMap:
        """Rows for allocated ``blocks``: one per block whose bitmap is uniform, else one
        per run of equal bits."""
        h = self.header
        assert h is not None
        block, bb = h.block_size, self._bitmap_bytes
        spb = block // SECTOR
        bitmap_at = self._bat[blocks]
        nbytes = -(-spb // 8)
        bitmaps = self.file.read_many(bitmap_at, bb, "VHD block bitmap")[:, :nbytes]
        unused = np.uint8((1 << (8 - spb % 8)) - 1) if spb % 8 else np.uint8(0)  # low bits past the block
        ones = (bitmaps[:, :-1] == 0xFF).all(axis=1) & ((bitmaps[:, -1] | unused) == 0xFF)
        zeros = (bitmaps[:, :-1] == 0).all(axis=1) & ((bitmaps[:, -1] & ~unused) == 0)
        uniform = ones | zeros
        data_at = bitmap_at + bb
        starts = [blocks[uniform] * block]
        lengths = [np.full(int(uniform.sum()), block, dtype=np.int64)]
        kinds = [np.where(ones[uniform], ExtentKind.DATA, ExtentKind.UNALLOCATED).astype(np.uint8)]
        offsets = [np.where(ones[uniform], data_at[uniform], NO_OFFSET)]
        mixed = np.flatnonzero(~uniform)
        if mixed.size:
            bits = np.unpackbits(bitmaps[mixed], axis=1)[:, :spb].astype(bool)  # MSB first: sector 0 = bit 7
            change = np.ones(bits.shape, dtype=bool)
            change[:, 1:] = bits[:, 1:] != bits[:, :-1]
            row, col = np.nonzero(change)
            run_end = np.append(col[1:], spb)
            run_end[np.append(row[1:] != row[:-1], True)] = spb
            is_data = bits[row, col]
            guest = blocks[mixed][row] * block + col * SECTOR
            starts.append(guest)
            lengths.append((run_end - col) * SECTOR)
            kinds.append(np.where(is_data, ExtentKind.DATA, ExtentKind.UNALLOCATED).astype(np.uint8))
            offsets.append(np.where(is_data, data_at[mixed][row] + col * SECTOR, NO_OFFSET))
        return ExtentMap(np.concatenate(starts), np.concatenate(lengths), np.concatenate(kinds),
                         np.concatenate(offsets))  # fmt: skip

    def info(self) -> dict[str, Any]:
        doc = super().info()
        doc.update(
            {
                "subformat": TYPE_NAMES[self.footer.disk_type],
                "creator": self.footer.creator.decode("latin-1").rstrip("\0"),
                "saved_state": self.footer.saved_state,
                "footer_intact": self.footer_intact,
            }
        )
        if self.header is not None:
            doc["allocated_blocks"] = int((self._bat >= 0).sum())
        return doc


class VhdFormat(ImageFormat):
    """Driver ``vhd`` (also registered as ``vpc``, QEMU's and libvirt's name)."""

    capabilities = FormatCapabilities(backing_files=True)

    def probe(self, file: ImageFile) -> int:
        if file.size < SECTOR:
            return 0
        if file.read(0, 8, "VHD cookie") == FOOTER_COOKIE:
            return 100
        # A fixed disk has its footer only at the end (QEMU does not probe for it; we
        # do, with the checksum, so a raw file with a stray cookie is not taken for one).
        tail = file.read(file.size - SECTOR, SECTOR, "VHD footer")
        if tail[:8] == FOOTER_COOKIE and checksum(tail, 64) == struct.unpack_from(">I", tail, 64)[0]:
            return 50
        return 0

    def open(self, file: ImageFile, opener: ImageOpener) -> Image:
        footer, intact = _read_footers(file)
        header = None
        if footer.disk_type != FIXED:
            header = parse_dynamic_header(file, footer.data_offset, footer)
        image = VhdImage(file, footer, intact, header)
        if footer.disk_type == DIFFERENCING:
            assert header is not None
            image.backing = _open_parent(file, header, opener)
        return image


def _parent_candidates(file: ImageFile, header: DynamicHeader) -> list[Path]:
    """Where the parent may be, in the order Windows and Xen look: relative, absolute,
    Mac URL locators, then the parent's name next to the child."""
    found: list[Path] = []
    directory = file.path.parent
    order = {W2RU: 0, W2KU: 1, MACX: 2}
    for loc in sorted(header.locators, key=lambda x: order.get(x.platform, 9)):
        if loc.platform not in order or not loc.length:
            continue
        raw = file.read(loc.offset, loc.length, "VHD parent locator")
        if loc.platform == MACX:
            from urllib.parse import unquote, urlparse

            url = raw.decode("utf-8", "replace").rstrip("\0")
            text = unquote(urlparse(url).path) if url.startswith("file:") else url
        else:
            text = raw.decode("utf-16-le", "replace").rstrip("\0")
        text = text.replace("\\", "/")
        if len(text) > 2 and text[1] == ":":  # a Windows drive letter: keep the file name
            text = text.split("/")[-1]
        if text.startswith("./"):
            text = text[2:]
        if text and "\0" not in text:
            path = Path(text)
            found.append(path if path.is_absolute() else directory / path)
    if header.parent_name and "\0" not in header.parent_name:
        found.append(directory / Path(header.parent_name.replace("\\", "/")).name)
    return found


def _open_parent(file: ImageFile, header: DynamicHeader, opener: ImageOpener) -> Image:
    tried = _parent_candidates(file, header)
    for path in tried:
        if not path.is_file():
            continue
        try:
            parent = opener(path, "vhd")
        except (UsageError, ImageError, DriverError) as exc:
            raise UnsupportedImageError(f"{file.path}: VHD parent {path} cannot be opened: {exc}") from exc
        if isinstance(parent, VhdImage) and parent.footer.unique_id != header.parent_id:
            parent.close()
            raise CorruptImageError(
                f"{file.path}: VHD parent {path} has unique id {parent.footer.unique_id.hex()}, but the "
                f"dynamic header at {header.offset:#x} names {header.parent_id.hex()}"
            )
        return parent
    names = ", ".join(str(p) for p in tried) or "none"
    raise UnsupportedImageError(f"{file.path}: parent of differencing VHD not found (tried: {names})")
