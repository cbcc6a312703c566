"""The qcow2 image as vmreclaim's :class:`Image`: the map, what may be punched, reads.

It assembles the parts of the package — the header (:mod:`.header`), the L1/L2
tables and their guest → host rows (:mod:`.tables`), refcounts and the reference
census (:mod:`.refcounts`) — and decides per data cluster whether it is the guest's
alone (else it maps as ``shared``). It also lays out where every structure lies in the
file, refuses overlapping ones, and runs the consistency check (:mod:`.check`) before
any punch. A dirty image (lazy refcounts) or one marked corrupt maps, but
:meth:`Qcow2Image.check_punchable` refuses it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import CorruptImageError, UnsupportedImageError, UsageError
from vmreclaim.core.extents import NO_OFFSET, ExtentMap, trim_to_window
from vmreclaim.core.formats import Image, ImageFile, first_overlap
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.plugins.formats.qcow2 import header as hdr
from vmreclaim.plugins.formats.qcow2.check import check_consistency
from vmreclaim.plugins.formats.qcow2.compress import decompress
from vmreclaim.plugins.formats.qcow2.deep import discard_clusters
from vmreclaim.plugins.formats.qcow2.header import Header
from vmreclaim.plugins.formats.qcow2.refcounts import Census, Refcounts, take_census
from vmreclaim.plugins.formats.qcow2.tables import DATA, SHARED, UNALLOC, Rows, Tables, l2_offsets

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


class Qcow2Image(Image):
    """A parsed qcow2 image; tables are read lazily and cached until :meth:`refresh`."""

    def __init__(self, file: ImageFile, header: Header, data_file: ImageFile | None) -> None:
        super().__init__(file, "qcow2")
        self._data_file = data_file
        self._load(header)

    def _load(self, h: Header) -> None:
        """Read the tables ``h`` names and forget every cache."""
        self.header = h
        self._cs = h.cluster_size
        self._cb = h.cluster_bits
        self._tables = Tables(self.file, h, external_data=self._data_file is not None)
        self._refcounts = Refcounts(self.file, h)
        self._snapshots, self._snapshot_table_len = hdr.parse_snapshots(self.file, h)
        self._bitmaps, self._bitmap_dir = hdr.parse_bitmaps(self.file, h)
        if h.crypto_area is not None:
            off, length = h.crypto_area
            hdr.check_table(self.file, "LUKS encryption header", off, length, self._cs)
        self._census_cache: Census | None = None
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
        for rows in self._tables.rows(window):
            self._resolve_shared(rows)
            pieces.append(ExtentMap(rows.starts, rows.lengths, rows.kinds, rows.offsets).merged())
        stored = ExtentMap.concat(pieces)
        cs = self._cs
        span = ByteRange.from_bounds(window.start // cs * cs, -(-window.end // cs) * cs)
        gaps = stored.guest_ranges().complement(span)
        n = len(gaps)
        unallocated = ExtentMap(
            gaps.starts, gaps.lengths, np.full(n, UNALLOC), np.full(n, NO_OFFSET, dtype=np.int64)
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
        check_consistency(
            self,
            self.file.path,
            self.file.size,
            external_data=self._data_file is not None,
            extended_l2=self.header.extended_l2,
        )
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
            entry = self._tables.l2_entry(c)
            if not entry & hdr.COMPRESSED:
                raise CorruptImageError(
                    f"{self.file.path}: qcow2 guest cluster {c} at {c * self._cs:#x} is not compressed "
                    "(the image changed while it was read?)"
                )
            data = decompress(self.file, self.header, entry, c)
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
        """Discard every whole cluster inside ``guest_ranges`` through ``qemu-io``
        (:func:`.deep.discard_clusters`), then read the tables again."""
        reason = self.deep_reclaim_refusal()
        if reason is not None:
            raise UnsupportedImageError(f"{self.file.path}: {reason}")
        discard_clusters(self.file.path, self._cs, self.virtual_size, guest_ranges)
        self.refresh()

    def _resolve_shared(self, rows: Rows) -> None:
        """Demote ``data`` rows that are not exclusively the guest's to ``shared``."""
        data = rows.kinds == DATA
        if not bool(data.any()):
            return
        ci = rows.offsets[data] >> self._cb
        exclusive = rows.copied[data].copy()
        if self._data_file is None:
            exclusive &= self._refcounts.of(ci) == 1
        if self._census_cache is None:
            self._census_cache = take_census(self._tables, self._snapshots)
        census = self._census_cache
        if census.shared.size:
            pos = np.searchsorted(census.shared, ci)
            hit = census.shared[np.minimum(pos, census.shared.size - 1)] == ci
            exclusive &= ~hit
        rows.kinds[data] = np.where(exclusive, DATA, SHARED)

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
        add("refcount block", self._refcounts.block_offsets(), cs)
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
        names = [f"L1 table of snapshot {s.name!r}" for s in self._snapshots]
        snapshot_l1s = self._tables.snapshot_l1s(self._snapshots)
        return [("active L1 table", self._tables.l1), *zip(names, snapshot_l1s, strict=True)]

    def l2_words(self, offsets: I64) -> Iterator[tuple[I64, U64]]:
        """``(table_offset_per_entry, first_word_per_entry)`` for every entry of the L2
        tables at ``offsets``, in batches that bound memory."""
        return self._tables.l2_words(offsets)

    def refcounts(self, clusters: I64) -> npt.NDArray[np.int64]:
        """Stored refcounts of host ``clusters`` (0 where no refcount block covers them)."""
        return self._refcounts.of(clusters)

    def references(self, offsets: I64) -> tuple[I64, I64]:
        """Host clusters the L2 tables at ``offsets`` name: (plain, compressed)."""
        return self._tables.references(offsets)

    def _metadata(self) -> RangeSet:
        """Every host range holding a qcow2 structure; overlapping structures are corrupt."""
        found = self.structures()
        l2_sets = [l2_offsets(l1) for _, l1 in self.l1_tables()]
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
