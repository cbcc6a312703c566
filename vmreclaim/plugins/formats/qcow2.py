"""The qcow2 format (versions 2 and 3): guest clusters through L1/L2 tables to the file.

What a cluster maps to, per L2 entry (QEMU ``qcow2_get_cluster_type`` and, with
extended L2 entries, ``qcow2_get_subcluster_type``):

* compressed flag → ``compressed`` (never punched: its bytes are packed with others);
* zero flag → ``zero`` (with the host offset of a preallocated cluster if there is one);
* a host offset (or, with an external data file, COPIED) → ``data`` if the cluster is
  the guest's alone, else ``shared``;
* nothing → ``unallocated`` (the backing file's bytes, or zeros).

"The guest's alone" is decided conservatively, from every source the image offers:
COPIED set in the active L2 entry, refcount exactly 1, and no other reference found by
a census of the active and snapshot tables (a second active reference, a compressed
cluster touching it, any snapshot's L2 table). A dirty image (lazy refcounts) or one
marked corrupt maps, but :meth:`Qcow2Image.check_punchable` refuses it.

Tables are read in large reads (:meth:`ImageFile.read_many`), L2 tables are kept in a
bounded cache, and every per-cluster decision is a numpy operation over whole tables.
"""

from __future__ import annotations

import os
import re
import stat
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import (
    CorruptImageError,
    DriverError,
    ImageBusyError,
    ImageError,
    UnsupportedImageError,
    UsageError,
    VMReclaimError,
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
from vmreclaim.plugins.formats import _qcow2_header as hdr
from vmreclaim.plugins.formats._qcow2_check import check_consistency
from vmreclaim.plugins.formats._qcow2_header import Header

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

#: L2 tables decoded per batch: bounds memory for images with tiny clusters.
_BATCH_ENTRIES = 1 << 20
#: Bytes of L2 tables kept between calls (``Image.read`` asks many small windows).
_L2_CACHE_BYTES = 32 * 1024 * 1024
#: ``qemu-io discard`` refuses requests above about 2 GiB; we send at most this.
_DISCARD_PIECE = 1 << 30
#: Discard commands per ``qemu-io`` run (each run re-opens the image).
_DISCARD_BATCH = 4096

_DATA, _SHARED, _COMPRESSED, _ZERO, _UNALLOC = (
    np.uint8(ExtentKind.DATA),
    np.uint8(ExtentKind.SHARED),
    np.uint8(ExtentKind.COMPRESSED),
    np.uint8(ExtentKind.ZERO),
    np.uint8(ExtentKind.UNALLOCATED),
)


@dataclass(frozen=True)
class _Census:
    """Host clusters referenced other than once, exclusively, from the active L1."""

    #: Sorted host cluster indices that a data cluster must not be: referenced twice
    #: from the active tables, touched by a compressed cluster, or used by a snapshot.
    shared: I64
    #: Host cluster indices of every L2 table named by a snapshot L1 (metadata).
    snapshot_l2: I64


@dataclass
class _Rows:
    """Per-(sub)cluster rows of a map before merging, plus each row's COPIED flag."""

    starts: I64
    lengths: I64
    kinds: npt.NDArray[np.uint8]
    offsets: I64
    copied: npt.NDArray[np.bool_]


class Qcow2Image(Image):
    """A parsed qcow2 image; tables are read lazily and cached until :meth:`refresh`."""

    def __init__(self, file: ImageFile, header: Header, data_file: ImageFile | None) -> None:
        super().__init__(file, "qcow2")
        self._data_file = data_file
        self._l2_cache: OrderedDict[int, U64] = OrderedDict()
        self._load(header)

    def _load(self, h: Header) -> None:
        """Read the tables ``h`` names and forget every cache."""
        self.header = h
        self._cs = h.cluster_size
        self._cb = h.cluster_bits
        self._l2n = h.l2_entries
        self._l1 = self._read_l1(h.l1_offset, h.l1_size, "active L1 table")
        self._reftable = self._read_reftable()
        self._snapshots, self._snapshot_table_len = hdr.parse_snapshots(self.file, h)
        self._bitmaps, self._bitmap_dir = hdr.parse_bitmaps(self.file, h)
        if h.crypto_area is not None:
            off, length = h.crypto_area
            hdr.check_table(self.file, "LUKS encryption header", off, length, self._cs)
        self._l2_cache.clear()
        self._l2_cached_bytes = 0
        self._refblocks: dict[int, npt.NDArray[np.uint8]] = {}
        self._census_cache: _Census | None = None
        self._metadata_cache: RangeSet | None = None

    # -- the Image contract ----------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self.header.size

    @property
    def cluster_size(self) -> int:
        return self._cs

    @property
    def data_file(self) -> ImageFile:
        return self._data_file if self._data_file is not None else self.file

    def refresh(self) -> None:
        # The header too: QEMU moves the L1 table on resize and rewrites the snapshot
        # table when a snapshot is taken.
        self.file.refresh_size()
        self.data_file.refresh_size()
        h = hdr.parse_header(self.file)
        if (h.has_data_file, h.data_file, h.backing_file) != (
            self.header.has_data_file,
            self.header.data_file,
            self.header.backing_file,
        ):
            raise UnsupportedImageError(
                f"{self.file.path}: qcow2 backing or data file changed while the image was open; "
                "open it again"
            )
        self._load(h)

    def map(self, window: ByteRange) -> ExtentMap:
        if window.end > self.virtual_size:
            raise UsageError(f"map window {window} lies outside the {self.virtual_size}-byte virtual disk")
        if not window.length:
            return ExtentMap.empty()
        pieces: list[ExtentMap] = []
        for rows in self._rows(window):
            self._resolve_shared(rows)
            pieces.append(ExtentMap(rows.starts, rows.lengths, rows.kinds, rows.offsets).merged())
        stored = ExtentMap.concat(pieces)
        cs = self._cs
        span = ByteRange.from_bounds(window.start // cs * cs, -(-window.end // cs) * cs)
        gaps = stored.guest_ranges().complement(span)
        n = len(gaps)
        unallocated = ExtentMap(
            gaps.starts, gaps.lengths, np.full(n, _UNALLOC), np.full(n, NO_OFFSET, dtype=np.int64)
        )
        result = ExtentMap.concat([stored, unallocated])
        order = np.argsort(result.starts, kind="stable")  # two sorted runs: a linear merge
        result = ExtentMap(
            result.starts[order], result.lengths[order], result.kinds[order], result.offsets[order]
        )
        result = result.merged()
        result = trim_to_window(result, window)
        result.require_covers(window, f"{self.file.path}: qcow2 map")
        return result

    def metadata_ranges(self) -> RangeSet:
        if self._metadata_cache is None:
            self._metadata_cache = self._metadata()
        if self._data_file is not None:
            return RangeSet()  # the structures live in the .qcow2 file, not the data file
        return self._metadata_cache

    def check_punchable(self) -> None:
        h = self.header
        if h.incompatible & hdr.INCOMPAT_CORRUPT:
            raise CorruptImageError(
                f"{self.file.path}: qcow2 image is marked corrupt (incompatible feature bit 1); "
                "repair it with `qemu-img check -r all` before reclaiming"
            )
        if h.incompatible & hdr.INCOMPAT_DIRTY:
            raise UnsupportedImageError(
                f"{self.file.path}: qcow2 image is dirty (lazy refcounts, not cleanly closed): its "
                "refcounts cannot be trusted; run `qemu-img check -r all` or open and close it in QEMU"
            )
        self.metadata_ranges()  # validates that no two structures overlap
        # What `qemu-img check` counts as an error: refcounts, COPIED flags, past EOF.
        check_consistency(self, self.file.path, self.file.size, external_data=self._data_file is not None)
        if self._data_file is not None:
            self._check_data_file()

    def _check_data_file(self) -> None:
        """Punching follows a file name read from the image: keep that name from aiming
        at anything but a plain file that sits next to the image and is no image itself.

        A hostile header could name a disk device or another VM's image. QEMU itself
        would write guest data there as soon as the VM runs; vmreclaim refuses to punch.
        """
        df = self._data_file
        assert df is not None
        where = f"{self.file.path}: qcow2 external data file {df.path}"
        try:
            st = os.lstat(df.path)
        except OSError as exc:
            raise UnsupportedImageError(f"{where} cannot be examined: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise UnsupportedImageError(
                f"{where} is not a regular file (a link or a device); refusing to punch it"
            )
        if os.path.realpath(df.path.parent) != os.path.realpath(self.file.path.parent):
            raise UnsupportedImageError(
                f"{where} is not in the image's directory; refusing to punch a file the image names elsewhere"
            )
        head = df.read(0, 8, "data file head") if df.size >= 8 else b""
        if head[:4] == hdr.MAGIC or head == b"conectix":
            raise UnsupportedImageError(f"{where} is itself a qcow2 or VHD image; refusing to punch it")

    def info(self) -> dict[str, Any]:
        h = self.header
        doc = super().info()
        doc.update(
            {
                "version": h.version,
                "refcount_bits": h.refcount_bits,
                "extended_l2": h.extended_l2,
                "compression_type": hdr.COMPRESSION_NAMES[h.compression_type],
                "encrypted": h.crypt_method != hdr.CRYPT_NONE,
                "dirty": bool(h.incompatible & hdr.INCOMPAT_DIRTY),
                "corrupt": bool(h.incompatible & hdr.INCOMPAT_CORRUPT),
                "data_file": str(self._data_file.path) if self._data_file is not None else None,
                "snapshots": [s.name for s in self._snapshots],
                "bitmaps": [b.name for b in self._bitmaps],
            }
        )
        return doc

    def read(self, offset: int, length: int) -> bytes:
        if self.header.crypt_method != hdr.CRYPT_NONE:
            raise UnsupportedImageError(
                f"{self.file.path}: qcow2 image is encrypted; its guest data cannot be read without the key"
            )
        return super().read(offset, length)

    def read_compressed(self, start: int, length: int) -> bytes:
        out = bytearray(length)
        end = start + length
        for c in range(start // self._cs, -(-end // self._cs)):
            entry = self._l2_entry(c)
            if not entry & hdr.COMPRESSED:
                raise CorruptImageError(
                    f"{self.file.path}: qcow2 guest cluster {c} at {c * self._cs:#x} is not compressed "
                    "(the image changed while it was read?)"
                )
            data = self._decompress(entry, c)
            lo, hi = max(start, c * self._cs), min(end, (c + 1) * self._cs)
            out[lo - start : hi - start] = data[lo - c * self._cs : hi - c * self._cs]
        return bytes(out)

    # -- deep reclaim through QEMU ---------------------------------------------------------------

    def deep_reclaim_refusal(self) -> str | None:
        h = self.header
        if h.crypt_method != hdr.CRYPT_NONE:
            return "encrypted qcow2 images have no deep reclaim mode (QEMU's tools would need the key)"
        if h.version == 2 and h.backing_file is not None:
            return "QEMU cannot discard clusters of a version 2 qcow2 image with a backing file"
        import shutil  # deep mode only: keep `image map` start-up lean

        if shutil.which("qemu-io") is None:
            return "deep reclaim needs qemu-io (package qemu-utils), which is not installed"
        return None

    def deep_discard(self, guest_ranges: RangeSet) -> None:
        """Discard every whole cluster inside ``guest_ranges`` through ``qemu-io``.

        QEMU then marks the clusters zero in the L2 tables, drops their refcounts and
        punches what becomes free (``-d unmap``), so QEMU reuses those clusters instead
        of growing the file. Only whole clusters can be discarded (QEMU ignores partial
        ones); the final partial cluster of a disk whose size is not a multiple of the
        cluster size counts as whole.
        """
        reason = self.deep_reclaim_refusal()
        if reason is not None:
            raise UnsupportedImageError(f"{self.file.path}: {reason}")
        cs, size = self._cs, self.virtual_size
        ranges = guest_ranges.clip(ByteRange(0, size))
        starts = -(-ranges.starts // cs) * cs
        ends = np.where(ranges.ends >= size, size, (ranges.ends // cs) * cs)
        keep = ends > starts
        commands: list[str] = []
        for s, e in zip(starts[keep].tolist(), ends[keep].tolist(), strict=True):
            for piece in range(s, e, _DISCARD_PIECE):
                commands.append(f"discard {piece} {min(_DISCARD_PIECE, e - piece)}")
        for i in range(0, len(commands), _DISCARD_BATCH):
            self._qemu_io(commands[i : i + _DISCARD_BATCH])
        self.refresh()

    def _qemu_io(self, commands: list[str]) -> None:
        import subprocess  # deep mode only: keep `image map` start-up lean

        argv = ["qemu-io", "-f", "qcow2", "-d", "unmap", str(self.file.path)]
        try:
            proc = subprocess.run(
                argv,
                input="\n".join(commands) + "\n",
                capture_output=True,
                text=True,
                timeout=3600,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VMReclaimError(f"{self.file.path}: qemu-io failed to run: {exc}") from exc
        output = proc.stdout + proc.stderr
        if re.search(r'Failed to get "?write"? lock|Is another process using the image', output):
            raise ImageBusyError(
                f"{self.file.path}: image is busy: another process holds it (qemu-io: "
                f"{output.strip().splitlines()[0]}); the punch was done, the deep discard was not"
            )
        failed = [line for line in output.splitlines() if "failed" in line or "error" in line.lower()]
        if proc.returncode != 0 or failed:
            detail = (failed or output.strip().splitlines() or [f"exit {proc.returncode}"])[0]
            raise ImageError(f"{self.file.path}: qemu-io discard failed: {detail}")

    # -- tables ------------------------------------------------------------------------------------

    def _read_l1(self, offset: int, size: int, what: str) -> U64:
        """An L1 table as uint64, its entries validated (reserved bits, alignment, bounds)."""
        l1 = self.file.read_array(offset, size, ">u8", f"qcow2 {what}").astype(np.uint64)
        bad = (l1 & np.uint64(hdr.L1E_RESERVED_MASK)) != 0
        offs = (l1 & np.uint64(hdr.L1E_OFFSET_MASK)).astype(np.int64)
        bad |= (offs % self._cs) != 0
        bad |= (offs != 0) & (offs > self.file.size - self._cs)
        if bool(bad.any()):
            i = int(np.argmax(bad))
            raise CorruptImageError(
                f"{self.file.path}: qcow2 {what} at {offset:#x}: entry #{i} ({int(l1[i]):#x}) has reserved "
                f"bits set, an unaligned L2 table offset, or one past end of file (size {self.file.size:#x})"
            )
        return l1

    def _read_reftable(self) -> U64:
        h = self.header
        count = h.refcount_table_clusters * self._cs // 8
        table = self.file.read_array(h.refcount_table_offset, count, ">u8", "qcow2 refcount table")
        table = table.astype(np.uint64)
        offs = (table & np.uint64(hdr.REFT_OFFSET_MASK)).astype(np.int64)
        bad = ((table & np.uint64(hdr.REFT_RESERVED_MASK)) != 0) | ((offs % self._cs) != 0)
        bad |= (offs != 0) & (offs > self.file.size - self._cs)
        if bool(bad.any()):
            i = int(np.argmax(bad))
            raise CorruptImageError(
                f"{self.file.path}: qcow2 refcount table at {h.refcount_table_offset:#x}: entry #{i} "
                f"({int(table[i]):#x}) has reserved bits set, is unaligned, or points past end of file"
            )
        return table

    def _l2_tables(self, offsets: I64) -> U64:
        """The L2 tables at ``offsets``: shape ``(n, entries)`` or ``(n, entries, 2)``."""
        width = 2 if self.header.extended_l2 else 1
        keys = offsets.tolist()
        tables: list[U64 | None] = [self._l2_cache.get(off) for off in keys]
        missing = [i for i, t in enumerate(tables) if t is None]
        fresh = None
        if missing:
            idx = np.array(missing, dtype=np.int64)
            raw = self.file.read_many(offsets[idx], self._cs, "qcow2 L2 table")
            fresh = raw.view(">u8").astype(np.uint64)
            for i, row in zip(missing, fresh, strict=True):
                tables[i] = row
                self._cache_l2(keys[i], row)
        for off in keys:
            if off in self._l2_cache:
                self._l2_cache.move_to_end(off)
        # Nothing was cached (a first full map): the fresh array is the answer, no copy.
        out = fresh if fresh is not None and len(missing) == len(keys) else np.stack(tables)  # type: ignore[arg-type]
        return out.reshape(offsets.size, self._l2n, width) if width == 2 else out

    def _cache_l2(self, offset: int, table: U64) -> None:
        self._l2_cache[offset] = table
        self._l2_cached_bytes += table.nbytes
        while self._l2_cached_bytes > _L2_CACHE_BYTES and len(self._l2_cache) > 1:
            _, old = self._l2_cache.popitem(last=False)
            self._l2_cached_bytes -= old.nbytes

    def _l2_entry(self, cluster: int) -> int:
        """The first word of the L2 entry of guest ``cluster`` (0 if its table is absent)."""
        l1i, l2i = divmod(cluster, self._l2n)
        if l1i >= self._l1.size:
            return 0
        l2_off = int(self._l1[l1i] & np.uint64(hdr.L1E_OFFSET_MASK))
        if not l2_off:
            return 0
        tables = self._l2_tables(np.array([l2_off], dtype=np.int64))
        return int(tables[0, l2i, 0] if self.header.extended_l2 else tables[0, l2i])

    # -- decoding ------------------------------------------------------------------------------------

    def _rows(self, window: ByteRange) -> list[_Rows]:
        """Rows for every (sub)cluster touching ``window`` whose L2 entry is not all zero,
        in guest order, in batches of L2 tables. Whatever they leave uncovered (absent L2
        tables, all-zero entries: most of a sparse disk) is unallocated."""
        cs, l2n = self._cs, self._l2n
        first_c, end_c = window.start // cs, -(-window.end // cs)
        l1_idx = np.arange(first_c // l2n, (end_c - 1) // l2n + 1, dtype=np.int64)
        l2_offs = (self._l1[l1_idx] & np.uint64(hdr.L1E_OFFSET_MASK)).astype(np.int64)
        present = np.flatnonzero(l2_offs)
        out: list[_Rows] = []
        per_batch = max(1, _BATCH_ENTRIES // l2n)
        ext = self.header.extended_l2
        for b in range(0, present.size, per_batch):
            sel = present[b : b + per_batch]
            tables = self._l2_tables(l2_offs[sel])
            words = tables.reshape(-1, 2) if ext else tables.reshape(-1)
            base = l1_idx[sel] * l2n  # guest cluster of each table's first entry
            # Only the window's first table can start before it and only its last
            # table end after it, so the entries inside form one slice.
            lo = max(0, first_c - int(base[0]))
            hi = words.shape[0] - max(0, int(base[-1]) + l2n - end_c)
            used = (words[lo:hi, 0] != 0) | (words[lo:hi, 1] != 0) if ext else words[lo:hi] != 0
            flat = np.flatnonzero(used) + lo
            table = flat // l2n
            clusters = base[table] + flat % l2n
            if ext:
                out.append(self._decode(words[flat, 0], words[flat, 1], clusters, l2_offs[sel][table]))
            else:
                out.append(self._decode(words[flat], None, clusters, l2_offs[sel][table]))
        return out

    def _decode(self, e: U64, bitmap: U64 | None, clusters: I64, table_of: I64) -> _Rows:
        """Rows for the L2 entries ``e`` of guest ``clusters`` (validated as they go)."""
        cs = self._cs
        comp = (e & np.uint64(hdr.COMPRESSED)) != 0
        copied = (e & np.uint64(hdr.COPIED)) != 0
        off = (e & np.uint64(hdr.L2E_OFFSET_MASK)).astype(np.int64)
        has_df = self._data_file is not None
        host = ~comp & ((off != 0) | (copied if has_df else False))  # a host cluster is named
        reserved = hdr.L2E_STD_RESERVED_MASK | (1 if bitmap is not None else 0)
        problems = [
            (~comp & ((e & np.uint64(reserved)) != 0), "has reserved bits set"),
            (host & ((off % cs) != 0), "names an unaligned host cluster"),
            (
                comp & (has_df or self.header.crypt_method != hdr.CRYPT_NONE),
                "is compressed in an image that cannot have compressed clusters",
            ),
        ]
        if bitmap is not None:
            alloc_bits = bitmap & np.uint64(0xFFFFFFFF)
            zero_bits = bitmap >> np.uint64(32)
            problems += [
                ((alloc_bits & zero_bits) != 0, "marks a subcluster both allocated and zero"),
                (~comp & ~host & (alloc_bits != 0), "allocates subclusters of an unallocated cluster"),
                (comp & (bitmap != 0), "is compressed but has a subcluster bitmap"),
            ]
        for bad, what in problems:
            if bool(np.any(bad)):
                i = int(np.argmax(bad))
                l2i = int(clusters[i]) % self._l2n
                raise CorruptImageError(
                    f"{self.file.path}: qcow2 L2 table at {int(table_of[i]):#x}: entry #{l2i} "
                    f"(guest offset {int(clusters[i]) * cs:#x}, value {int(e[i]):#x}) {what}"
                )
        if bitmap is None:
            zero = ~comp & ((e & np.uint64(hdr.ZERO)) != 0)
            kinds = np.full(e.size, _UNALLOC)
            kinds[host & ~zero] = _DATA
            kinds[zero] = _ZERO
            kinds[comp] = _COMPRESSED
            offsets = np.where((kinds == _DATA) | (zero & (off != 0)), off, NO_OFFSET)
            return _Rows(clusters * cs, np.full(e.size, cs, dtype=np.int64), kinds, offsets, copied)
        return self._decode_subclusters(comp, host, off, copied, alloc_bits, zero_bits, clusters)

    def _decode_subclusters(
        self,
        comp: npt.NDArray[np.bool_],
        host: npt.NDArray[np.bool_],
        off: I64,
        copied: npt.NDArray[np.bool_],
        alloc_bits: U64,
        zero_bits: U64,
        clusters: I64,
    ) -> _Rows:
        """Extended L2: one row per uniform cluster, 32 rows per mixed one."""
        cs = self._cs
        sc = cs // 32
        full = np.uint64(0xFFFFFFFF)
        all_data = host & (alloc_bits == full)
        all_zero = ~comp & (zero_bits == full)
        none = ~comp & (alloc_bits == 0) & (zero_bits == 0)
        uniform = comp | all_data | all_zero | none
        counts = np.where(uniform, 1, 32)
        owner = np.repeat(np.arange(clusters.size), counts)
        sub = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
        uni = uniform[owner]
        starts = clusters[owner] * cs + sub * sc
        lengths = np.where(uni, cs, sc).astype(np.int64)
        shift = sub.astype(np.uint64)
        a_bit = ((alloc_bits[owner] >> shift) & np.uint64(1)) != 0
        z_bit = ((zero_bits[owner] >> shift) & np.uint64(1)) != 0
        kinds = np.full(owner.size, _UNALLOC)
        kinds[np.where(uni, all_data[owner], a_bit)] = _DATA
        kinds[np.where(uni, all_zero[owner], z_bit)] = _ZERO
        kinds[comp[owner]] = _COMPRESSED
        base = off[owner] + sub * sc
        offsets = np.where((kinds == _DATA) | ((kinds == _ZERO) & host[owner]), base, NO_OFFSET)
        return _Rows(starts, lengths, kinds, offsets, copied[owner])

    def _resolve_shared(self, rows: _Rows) -> None:
        """Demote ``data`` rows that are not exclusively the guest's to ``shared``."""
        data = rows.kinds == _DATA
        if not bool(data.any()):
            return
        ci = rows.offsets[data] >> self._cb
        exclusive = rows.copied[data].copy()
        if self._data_file is None:
            exclusive &= self._refcounts(ci) == 1
        census = self._census()
        if census.shared.size:
            pos = np.searchsorted(census.shared, ci)
            hit = census.shared[np.minimum(pos, census.shared.size - 1)] == ci
            exclusive &= ~hit
        rows.kinds[data] = np.where(exclusive, _DATA, _SHARED)

    def _refcounts(self, clusters: I64) -> npt.NDArray[np.int64]:
        """Refcounts of host ``clusters`` (0 where no refcount block covers them)."""
        bits = self.header.refcount_bits
        per_block = self._cs * 8 // bits
        block_idx, within = np.divmod(clusters, per_block)
        out = np.zeros(clusters.size, dtype=np.int64)
        for b in np.unique(block_idx).tolist():
            if b >= self._reftable.size:
                continue
            block = self._refblock(b)
            if block is None:
                continue
            sel = block_idx == b
            idx = within[sel]
            if bits >= 8:
                values = block.view(f">u{bits // 8}")[idx].astype(np.uint64)
                # A 64-bit refcount above 2**63 is no use to anyone: treat it as shared.
                out[sel] = np.minimum(values, np.uint64(2**62)).astype(np.int64)
            else:
                per = 8 // bits
                byte = block[idx // per].astype(np.int64)
                out[sel] = (byte >> ((idx % per) * bits)) & ((1 << bits) - 1)
        return out

    def _refblock(self, index: int) -> npt.NDArray[np.uint8] | None:
        if index not in self._refblocks:
            off = int(self._reftable[index] & np.uint64(hdr.REFT_OFFSET_MASK))
            if not off:
                return None
            self._refblocks[index] = np.frombuffer(
                self.file.read(off, self._cs, "qcow2 refcount block"), dtype=np.uint8
            )
        return self._refblocks[index]

    # -- census and metadata ---------------------------------------------------------------------

    def _references(self, l2_offsets: I64) -> tuple[I64, I64]:
        """Host clusters named by the L2 tables at ``l2_offsets``: (plain, compressed).

        Plain references are one entry per L2 entry that names a host cluster (so a
        cluster named twice appears twice); compressed ones list every host cluster a
        compressed cluster's sectors touch.
        """
        plain: list[I64] = []
        packed: list[I64] = []
        per_batch = max(1, _BATCH_ENTRIES // self._l2n)
        has_df = self._data_file is not None
        nb_bits = self._cb - 8
        shift = np.uint64(62 - nb_bits)
        for b in range(0, l2_offsets.size, per_batch):
            tables = self._l2_tables(l2_offsets[b : b + per_batch])
            e = (tables[:, :, 0] if self.header.extended_l2 else tables).reshape(-1)
            comp = (e & np.uint64(hdr.COMPRESSED)) != 0
            off = (e & np.uint64(hdr.L2E_OFFSET_MASK)).astype(np.int64)
            copied = (e & np.uint64(hdr.COPIED)) != 0
            host = ~comp & ((off != 0) | (copied if has_df else False))
            plain.append(off[host] >> self._cb)
            ce = e[comp]
            if ce.size:
                coff = (ce & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.int64)
                nsec = ((ce >> shift) & np.uint64((1 << nb_bits) - 1)).astype(np.int64) + 1
                first = coff >> self._cb
                last = ((coff & ~np.int64(511)) + nsec * 512 - 1) >> self._cb
                counts = last - first + 1
                packed.append(
                    np.repeat(first, counts)
                    + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
                )
        empty = np.zeros(0, dtype=np.int64)
        return (np.concatenate(plain) if plain else empty, np.concatenate(packed) if packed else empty)

    def _l2_offsets(self, l1: U64) -> I64:
        offs: I64 = (l1 & np.uint64(hdr.L1E_OFFSET_MASK)).astype(np.int64)
        nonzero: I64 = offs[offs != 0]
        return nonzero

    def _snapshot_l1s(self) -> list[U64]:
        return [
            self._read_l1(s.l1_offset, s.l1_size, f"L1 table of snapshot {s.name!r}") for s in self._snapshots
        ]

    def _census(self) -> _Census:
        if self._census_cache is None:
            active_plain, active_packed = self._references(self._l2_offsets(self._l1))
            values, counts = np.unique(active_plain, return_counts=True)
            shared = [values[counts > 1], active_packed]
            snap_l2: list[I64] = []
            for l1 in self._snapshot_l1s():
                tables = np.unique(self._l2_offsets(l1))
                plain, packed = self._references(tables)
                shared += [plain, packed]
                snap_l2.append(tables >> self._cb)
            empty = np.zeros(0, dtype=np.int64)
            self._census_cache = _Census(
                np.unique(np.concatenate(shared)),
                np.unique(np.concatenate(snap_l2)) if snap_l2 else empty,
            )
        return self._census_cache

    def structures(self) -> list[tuple[str, I64, I64]]:
        """Every qcow2 structure but L2 tables and data clusters, as ``(name, starts,
        lengths)`` in whole clusters: what QEMU counts once each in the refcounts."""
        h, cs = self.header, self._cs
        out: list[tuple[str, I64, I64]] = []

        def add(what: str, offs: Any, length: int | I64) -> None:
            arr = np.atleast_1d(np.asarray(offs, dtype=np.int64))
            if arr.size:
                out.append((what, arr, np.broadcast_to(np.asarray(length, dtype=np.int64), arr.shape)))

        def clusters_of(nbytes: int) -> int:
            return max(cs, -(-nbytes // cs) * cs)

        add("header cluster", 0, cs)
        add("active L1 table", h.l1_offset, clusters_of(h.l1_size * 8))
        add("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs)
        blocks = (self._reftable & np.uint64(hdr.REFT_OFFSET_MASK)).astype(np.int64)
        add("refcount block", blocks[blocks != 0], cs)
        if self._snapshots:
            add("snapshot table", h.snapshots_offset, clusters_of(self._snapshot_table_len))
            for snap in self._snapshots:
                add(f"L1 table of snapshot {snap.name!r}", snap.l1_offset, clusters_of(snap.l1_size * 8))
        if self._bitmap_dir is not None:
            add("bitmap directory", self._bitmap_dir[0], clusters_of(self._bitmap_dir[1]))
        for bm in self._bitmaps:
            add(f"table of bitmap {bm.name!r}", bm.table_offset, clusters_of(bm.table_size * 8))
            table = self.file.read_array(
                bm.table_offset, bm.table_size, ">u8", f"qcow2 table of bitmap {bm.name!r}"
            ).astype(np.uint64)
            data = (table & np.uint64(hdr.L2E_OFFSET_MASK)).astype(np.int64)
            data = data[data != 0]
            if bool(((data % cs != 0) | (data > self.file.size - cs)).any()):
                raise CorruptImageError(
                    f"{self.file.path}: qcow2 table of bitmap {bm.name!r} at {bm.table_offset:#x} names an "
                    "unaligned data cluster or one past end of file"
                )
            add(f"data of bitmap {bm.name!r}", data, cs)
        if h.crypto_area is not None:
            add("LUKS encryption header", h.crypto_area[0], clusters_of(h.crypto_area[1]))
        return out

    def l1_tables(self) -> list[tuple[str, U64]]:
        """The active L1 table, then every snapshot's, with their names."""
        named = [(f"L1 table of snapshot {s.name!r}", s) for s in self._snapshots]
        return [("active L1 table", self._l1)] + [
            (name, l1) for (name, _), l1 in zip(named, self._snapshot_l1s(), strict=True)
        ]

    def l2_words(self, l2_offsets: I64) -> Iterator[tuple[I64, U64]]:
        """``(table_offset_per_entry, first_word_per_entry)`` for every entry of the L2
        tables at ``l2_offsets``, in batches that bound memory."""
        per_batch = max(1, _BATCH_ENTRIES // self._l2n)
        for b in range(0, l2_offsets.size, per_batch):
            offs = l2_offsets[b : b + per_batch]
            tables = self._l2_tables(offs)
            words = (tables[:, :, 0] if self.header.extended_l2 else tables).reshape(-1)
            yield np.repeat(offs, self._l2n), words

    def refcounts(self, clusters: I64) -> npt.NDArray[np.int64]:
        """Stored refcounts of host ``clusters`` (0 where no refcount block covers them)."""
        return self._refcounts(clusters)

    def references(self, l2_offsets: I64) -> tuple[I64, I64]:
        """Host clusters the L2 tables at ``l2_offsets`` name: (plain, compressed)."""
        return self._references(l2_offsets)

    def _metadata(self) -> RangeSet:
        """Every host range holding a qcow2 structure; overlapping structures are corrupt."""
        found = self.structures()
        l2_sets = [self._l2_offsets(l1) for _, l1 in self.l1_tables()]
        l2 = np.unique(np.concatenate(l2_sets))
        if l2.size:
            found.append(("L2 table", l2, np.full(l2.size, self._cs, dtype=np.int64)))
        names = [name for name, offs, _ in found for _ in range(offs.size)]
        s = np.concatenate([offs for _, offs, _ in found])
        n = np.concatenate([lens for _, _, lens in found])
        clash = first_overlap(s, n)
        if clash is not None:
            i, j = clash
            raise CorruptImageError(
                f"{self.file.path}: qcow2 {names[j]} at {int(s[j]):#x} overlaps the "
                f"{names[i]} at {int(s[i]):#x}"
            )
        return RangeSet(s, s + n)

    # -- compressed clusters ---------------------------------------------------------------------

    def _decompress(self, entry: int, cluster: int) -> bytes:
        cs, cb = self._cs, self._cb
        nb_bits = cb - 8
        shift = 62 - nb_bits
        coff = entry & ((1 << shift) - 1)
        nsec = ((entry >> shift) & ((1 << nb_bits) - 1)) + 1
        end = min((coff & ~511) + nsec * 512, self.file.size)
        where = f"compressed guest cluster {cluster} (host {coff:#x})"
        if coff >= end:
            raise CorruptImageError(f"{self.file.path}: qcow2 {where} lies past end of file")
        raw = self.file.read(coff, end - coff, f"qcow2 {where}")
        if self.header.compression_type == 1:
            data = _zstd_decompress(raw, cs, self.file.path, where)
        else:
            try:
                d = zlib.decompressobj(-15)
                data = d.decompress(raw, cs)
            except zlib.error as exc:
                raise CorruptImageError(f"{self.file.path}: qcow2 {where}: bad deflate data: {exc}") from exc
        if len(data) != cs:
            raise CorruptImageError(
                f"{self.file.path}: qcow2 {where} decompresses to {len(data)} bytes, not {cs}"
            )
        return data


def _zstd_decompress(raw: bytes, size: int, path: Path, where: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise UnsupportedImageError(
            f"{path}: qcow2 {where} is zstd-compressed; reading it needs the Python module "
            "'zstandard' (pip install zstandard)"
        ) from None
    import io

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=False)
        return bytes(reader.read(size))
    except zstandard.ZstdError as exc:
        raise CorruptImageError(f"{path}: qcow2 {where}: bad zstd data: {exc}") from exc


class Qcow2Format(ImageFormat):
    """Driver ``qcow2``: QEMU's copy-on-write format, versions 2 and 3."""

    capabilities = FormatCapabilities(backing_files=True, deep_reclaim=True)

    def probe(self, file: ImageFile) -> int:
        if file.size < 4:
            return 0
        return 100 if file.read(0, 4, "qcow2 magic") == hdr.MAGIC else 0

    def open(self, file: ImageFile, opener: ImageOpener) -> Image:
        h = hdr.parse_header(file)
        directory = file.path.parent
        data_file = None
        if h.data_file is not None:
            data_path = _resolve(directory, h.data_file, file.path, "external data file")
            if data_path.resolve() == file.path.resolve():
                raise CorruptImageError(f"{file.path}: qcow2 external data file names the image itself")
            try:
                data_file = opener.data_file(data_path)
            except UsageError as exc:
                raise UnsupportedImageError(
                    f"{file.path}: qcow2 external data file {h.data_file!r} cannot be opened: {exc}"
                ) from exc
        try:
            image = Qcow2Image(file, h, data_file)
            if h.backing_file is not None:
                backing_path = _resolve(directory, h.backing_file, file.path, "backing file")
                if data_file is not None and backing_path.resolve() == data_file.path.resolve():
                    raise CorruptImageError(
                        f"{file.path}: qcow2 backing file and external data file are the same file"
                    )
                try:
                    image.backing = opener(backing_path, h.backing_format or "")
                except (UsageError, ImageError, DriverError) as exc:
                    raise UnsupportedImageError(
                        f"{file.path}: qcow2 backing file {h.backing_file!r} cannot be opened: {exc}"
                    ) from exc
            return image
        except BaseException:
            if data_file is not None:
                data_file.close()
            raise


def _resolve(directory: Path, name: str, image: Path, what: str) -> Path:
    """A file named in an image header, relative to the image's directory as QEMU does."""
    if "\0" in name or not name:
        raise CorruptImageError(f"{image}: qcow2 {what} name {name!r} is empty or has a NUL byte")
    protocol = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", name) is not None and not os.path.exists(name)
    if name.startswith("json:") or protocol:
        raise UnsupportedImageError(f"{image}: qcow2 {what} {name!r} is not a local file")
    path = Path(name)
    return path if path.is_absolute() else directory / path
