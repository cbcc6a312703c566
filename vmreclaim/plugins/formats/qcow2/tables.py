"""The qcow2 L1 and L2 tables, and the guest → host map they describe.

What a cluster maps to, per L2 entry (QEMU ``qcow2_get_cluster_type`` and, with
extended L2 entries, ``qcow2_get_subcluster_type``):

* compressed flag → ``compressed`` (never punched: its bytes are packed with others);
* zero flag → ``zero`` (with the host offset of a preallocated cluster if there is one);
* a host offset (or, with an external data file, COPIED) → ``data`` (which the image
  demotes to ``shared`` unless the cluster is the guest's alone);
* nothing → ``unallocated`` (the backing file's bytes, or zeros).

Tables are read in large reads (:meth:`ImageFile.read_many`), L2 tables are kept in a
bounded cache, every entry is validated as it is decoded, and every per-cluster
decision is a numpy operation over whole tables. Kept apart from the image so that the
map, the census and the consistency check read the tables one way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import CorruptImageError
from vmreclaim.core.extents import NO_OFFSET, ExtentKind
from vmreclaim.core.formats import ImageFile
from vmreclaim.core.ranges import ByteRange
from vmreclaim.plugins.formats.qcow2 import header as hdr
from vmreclaim.plugins.formats.qcow2.header import Header, Snapshot

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

#: L2 tables decoded per batch: bounds memory for images with tiny clusters.
_BATCH_ENTRIES = 1 << 20
#: Bytes of L2 tables kept between calls (``Image.read`` asks many small windows).
_L2_CACHE_BYTES = 32 * 1024 * 1024

DATA, SHARED, COMPRESSED, ZERO, UNALLOC = (
    np.uint8(ExtentKind.DATA),
    np.uint8(ExtentKind.SHARED),
    np.uint8(ExtentKind.COMPRESSED),
    np.uint8(ExtentKind.ZERO),
    np.uint8(ExtentKind.UNALLOCATED),
)


@dataclass
class Rows:
    """Per-(sub)cluster rows of a map before merging, plus each row's COPIED flag."""

    starts: I64
    lengths: I64
    kinds: npt.NDArray[np.uint8]
    offsets: I64
    copied: npt.NDArray[np.bool_]


def l2_offsets(l1: U64) -> I64:
    """The L2 table offsets an L1 table names (its non-empty entries)."""
    offs: I64 = (l1 & np.uint64(hdr.L1E_OFFSET_MASK)).astype(np.int64)
    nonzero: I64 = offs[offs != 0]
    return nonzero


class Tables:
    """The active L1 table (read and validated at once) and the L2 tables, read lazily."""

    def __init__(self, file: ImageFile, header: Header, *, external_data: bool) -> None:
        self.file = file
        self.header = header
        self._cs = header.cluster_size
        self._cb = header.cluster_bits
        self._l2n = header.l2_entries
        self._external_data = external_data
        self._l2_cache: OrderedDict[int, U64] = OrderedDict()
        self._l2_cached_bytes = 0
        self.l1 = self.read_l1(header.l1_offset, header.l1_size, "active L1 table")

    def read_l1(self, offset: int, size: int, what: str) -> U64:
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

    def snapshot_l1s(self, snapshots: list[Snapshot]) -> list[U64]:
        """The L1 table of each of ``snapshots``, validated."""
        return [self.read_l1(s.l1_offset, s.l1_size, f"L1 table of snapshot {s.name!r}") for s in snapshots]

    def l2_tables(self, offsets: I64) -> U64:
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

    def l2_entry(self, cluster: int) -> int:
        """The first word of the L2 entry of guest ``cluster`` (0 if its table is absent)."""
        l1i, l2i = divmod(cluster, self._l2n)
        if l1i >= self.l1.size:
            return 0
        l2_off = int(self.l1[l1i] & np.uint64(hdr.L1E_OFFSET_MASK))
        if not l2_off:
            return 0
        tables = self.l2_tables(np.array([l2_off], dtype=np.int64))
        return int(tables[0, l2i, 0] if self.header.extended_l2 else tables[0, l2i])

    def l2_words(self, offsets: I64) -> Iterator[tuple[I64, U64]]:
        """``(table_offset_per_entry, first_word_per_entry)`` for every entry of the L2
        tables at ``offsets``, in batches that bound memory."""
        per_batch = max(1, _BATCH_ENTRIES // self._l2n)
        for b in range(0, offsets.size, per_batch):
            offs = offsets[b : b + per_batch]
            tables = self.l2_tables(offs)
            words = (tables[:, :, 0] if self.header.extended_l2 else tables).reshape(-1)
            yield np.repeat(offs, self._l2n), words

    def references(self, offsets: I64) -> tuple[I64, I64]:
        """Host clusters named by the L2 tables at ``offsets``: (plain, compressed).

        Plain references are one entry per L2 entry that names a host cluster (so a
        cluster named twice appears twice); compressed ones list every host cluster a
        compressed cluster's sectors touch.
        """
        plain: list[I64] = []
        packed: list[I64] = []
        per_batch = max(1, _BATCH_ENTRIES // self._l2n)
        has_df = self._external_data
        nb_bits = self._cb - 8
        shift = np.uint64(62 - nb_bits)
        for b in range(0, offsets.size, per_batch):
            tables = self.l2_tables(offsets[b : b + per_batch])
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

    # -- decoding into map rows ----------------------------------------------------------------

    def rows(self, window: ByteRange) -> list[Rows]:
        """Rows for every (sub)cluster touching ``window`` whose L2 entry is not all zero,
        in guest order, in batches of L2 tables. Whatever they leave uncovered (absent L2
        tables, all-zero entries: most of a sparse disk) is unallocated."""
        cs, l2n = self._cs, self._l2n
        first_c, end_c = window.start // cs, -(-window.end // cs)
        l1_idx = np.arange(first_c // l2n, (end_c - 1) // l2n + 1, dtype=np.int64)
        l2_offs = (self.l1[l1_idx] & np.uint64(hdr.L1E_OFFSET_MASK)).astype(np.int64)
        present = np.flatnonzero(l2_offs)
        out: list[Rows] = []
        per_batch = max(1, _BATCH_ENTRIES // l2n)
        ext = self.header.extended_l2
        for b in range(0, present.size, per_batch):
            sel = present[b : b + per_batch]
            tables = self.l2_tables(l2_offs[sel])
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

    def _decode(self, e: U64, bitmap: U64 | None, clusters: I64, table_of: I64) -> Rows:
        """Rows for the L2 entries ``e`` of guest ``clusters`` (validated as they go)."""
        cs = self._cs
        comp = (e & np.uint64(hdr.COMPRESSED)) != 0
        copied = (e & np.uint64(hdr.COPIED)) != 0
        off = (e & np.uint64(hdr.L2E_OFFSET_MASK)).astype(np.int64)
        has_df = self._external_data
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
            kinds = np.full(e.size, UNALLOC)
            kinds[host & ~zero] = DATA
            kinds[zero] = ZERO
            kinds[comp] = COMPRESSED
            offsets = np.where((kinds == DATA) | (zero & (off != 0)), off, NO_OFFSET)
            return Rows(clusters * cs, np.full(e.size, cs, dtype=np.int64), kinds, offsets, copied)
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
    ) -> Rows:
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
        kinds = np.full(owner.size, UNALLOC)
        kinds[np.where(uni, all_data[owner], a_bit)] = DATA
        kinds[np.where(uni, all_zero[owner], z_bit)] = ZERO
        kinds[comp[owner]] = COMPRESSED
        base = off[owner] + sub * sc
        offsets = np.where((kinds == DATA) | ((kinds == ZERO) & host[owner]), base, NO_OFFSET)
        return Rows(starts, lengths, kinds, offsets, copied[owner])
