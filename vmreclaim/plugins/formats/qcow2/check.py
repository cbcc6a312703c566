"""The consistency check of a qcow2 image before anything is punched: what ``qemu-img
check`` counts as an error refuses (:class:`CorruptImageError`, exit 4).

The map of a corrupt image cannot be trusted: an L2 entry naming a cluster past the
end of the file, or a data cluster that a refcount block or another table also uses,
would let a punch destroy bytes that are not the guest's free data. QEMU's own check
(``block/qcow2-refcount.c``) recounts every reference from the tables and compares;
this module does the same, vectorised:

* every reference is counted — the header cluster, the active and snapshot L1 tables,
  each L2 table once per L1 entry naming it, each data cluster once per L2 entry
  naming it (compressed clusters: every cluster their sectors touch), the refcount
  table and blocks, the snapshot table, bitmaps and the encryption header;
* a referenced cluster past the end of the file, or whose stored refcount is smaller
  than its references (zero included: "in use but free"), is an error — a larger
  stored refcount is only a leak, as for QEMU;
* the COPIED flag of every active L1 and L2 entry must say exactly "refcount is 1".

Overlapping structures, unaligned offsets and reserved bits are refused where the
tables are read (:mod:`.tables`, :mod:`.refcounts`, :mod:`.header`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import CorruptImageError
from vmreclaim.plugins.formats.qcow2 import header as hdr

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


class Tables(Protocol):
    """What the check reads of an open qcow2 image."""

    @property
    def cluster_size(self) -> int: ...

    def structures(self) -> list[tuple[str, I64, I64]]: ...

    def l1_tables(self) -> list[tuple[str, U64]]: ...

    def references(self, l2_offsets: I64) -> tuple[I64, I64]: ...

    def l2_words(self, l2_offsets: I64) -> Iterator[tuple[I64, U64]]: ...

    def refcounts(self, clusters: I64) -> npt.NDArray[np.int64]: ...


def _clusters_touched(starts: I64, lengths: I64, bits: int) -> I64:
    first = starts >> bits
    counts = ((starts + lengths - 1) >> bits) - first + 1
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    out: I64 = np.repeat(first, counts) + within
    return out


def check_consistency(
    img: Tables, path: Path, file_size: int, *, external_data: bool, extended_l2: bool
) -> None:
    """Raise :class:`CorruptImageError` on the first kind of error ``qemu-img check``
    would count, naming the structure, the numbers and how many share the problem."""
    cs = img.cluster_size
    bits = cs.bit_length() - 1
    refs: list[I64] = []
    structures = img.structures()
    for _, starts, lengths in structures:
        refs.append(_clusters_touched(starts, lengths, bits))
    l1s = img.l1_tables()
    for name, l1 in l1s:
        # QEMU's check takes any non-zero L1 entry as naming an L2 table, even one
        # whose offset bits are 0 (the header cluster): so do we.
        used = np.flatnonzero(l1)
        l2 = (l1[used] & np.uint64(hdr.L1E_OFFSET_MASK)).astype(np.int64)
        if bool((l2 == 0).any()):
            i = int(used[int(np.argmax(l2 == 0))])
            raise CorruptImageError(
                f"{path}: qcow2 {name} entry #{i} ({int(l1[i]):#x}) has flags but no L2 table offset; "
                "refusing to punch"
            )
        refs.append(l2 >> bits)
        _check_entries(img, path, l2, cs, extended_l2)
        plain, packed = img.references(l2)
        if not external_data:  # data clusters live in the data file, without refcounts
            refs.append(plain)
        refs.append(packed)
    values, counts = np.unique(np.concatenate(refs), return_counts=True)
    file_clusters = -(-file_size // cs)
    past = values >= file_clusters
    if bool(past.any()):
        first = int(values[int(np.argmax(past))])
        raise CorruptImageError(
            f"{path}: qcow2 tables reference {int(past.sum())} host cluster(s) past end of file "
            f"(first: cluster at {first * cs:#x}, file size {file_size:#x}); refusing to punch "
            "(`qemu-img check` counts these as errors)"
        )
    stored = img.refcounts(values)
    short = stored < counts
    if bool(short.any()):
        i = int(np.argmax(short))
        raise CorruptImageError(
            f"{path}: qcow2 refcounts disagree with the tables for {int(short.sum())} cluster(s) "
            f"(first: cluster at {int(values[i]) * cs:#x} has refcount {int(stored[i])} but "
            f"{int(counts[i])} reference(s)); refusing to punch (`qemu-img check -r all` repairs it)"
        )
    # A refcount block counts its own cluster: anything else using that cluster (a
    # data cluster, a table) would corrupt refcounts on the next write.
    blocks: I64 = np.concatenate(
        [offs for name, offs, _ in structures if name == "refcount block"] or [np.zeros(0, np.int64)]
    )
    pos = np.searchsorted(values, blocks >> bits)
    twice = counts[pos] != 1
    if bool(twice.any()):
        k = int(np.argmax(twice))
        raise CorruptImageError(
            f"{path}: qcow2 refcount block at {int(blocks[k]):#x} is referenced {int(counts[pos][k])} "
            "times (it must be used by nothing else); refusing to punch"
        )
    _check_copied(img, path, l1s[0][1], bits, external_data)


def _check_entries(img: Tables, path: Path, l2: I64, cs: int, extended_l2: bool) -> None:
    """Reserved bits and alignment of every entry of every L2 table (snapshots' too:
    the map reads only the active ones, QEMU's check reads all)."""
    reserved = np.uint64(hdr.L2E_STD_RESERVED_MASK | (hdr.ZERO if extended_l2 else 0))
    for table_of, e in img.l2_words(np.unique(l2)):
        comp = (e & np.uint64(hdr.COMPRESSED)) != 0
        off = (e & np.uint64(hdr.L2E_OFFSET_MASK)).astype(np.int64)
        problems = [
            (~comp & ((e & reserved) != 0), "has reserved bits set"),
            (~comp & (off % cs != 0), "names an unaligned host cluster"),
        ]
        for bad, what in problems:
            if bool(bad.any()):
                k = int(np.argmax(bad))
                raise CorruptImageError(
                    f"{path}: qcow2 L2 table at {int(table_of[k]):#x}: an entry ({int(e[k]):#x}) {what} "
                    f"({int(bad.sum())} such entries in this batch); refusing to punch"
                )


def _check_copied(img: Tables, path: Path, l1: U64, bits: int, external_data: bool) -> None:
    """QEMU's ``check_oflag_copied``: COPIED set exactly where the refcount is 1."""
    l2 = (l1 & np.uint64(hdr.L1E_OFFSET_MASK)).astype(np.int64)
    used = np.flatnonzero(l2)
    if not used.size:
        return
    copied = (l1[used] & np.uint64(hdr.COPIED)) != 0
    wrong = copied != (img.refcounts(l2[used] >> bits) == 1)
    if bool(wrong.any()):
        i = int(used[int(np.argmax(wrong))])
        raise CorruptImageError(
            f"{path}: qcow2 active L1 table entry #{i} ({int(l1[i]):#x}): its COPIED flag disagrees "
            "with the L2 table's refcount; refusing to punch"
        )
    if external_data:
        return  # COPIED marks allocation there; data clusters have no refcount
    for table_of, e in img.l2_words(l2[used]):
        comp = (e & np.uint64(hdr.COMPRESSED)) != 0
        off = (e & np.uint64(hdr.L2E_OFFSET_MASK)).astype(np.int64)
        host = ~comp & (off != 0)
        if not bool(host.any()):
            continue
        flag = (e[host] & np.uint64(hdr.COPIED)) != 0
        wrong = flag != (img.refcounts(off[host] >> bits) == 1)
        if bool(wrong.any()):
            k = int(np.argmax(wrong))
            raise CorruptImageError(
                f"{path}: qcow2 L2 table at {int(table_of[host][k]):#x}: an entry ({int(e[host][k]):#x}) "
                f"has a COPIED flag that disagrees with its cluster's refcount ({int(wrong.sum())} such "
                "entries in this batch); refusing to punch"
            )
