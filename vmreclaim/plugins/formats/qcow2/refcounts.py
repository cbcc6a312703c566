"""Who owns a qcow2 host cluster: the stored refcounts and a census of the references.

A data cluster is "the guest's alone", and so may be punched, only when every source
the image offers agrees: COPIED set in the active L2 entry, refcount exactly 1, and no
other reference found by the census of the active and snapshot tables (a second
active reference, a compressed cluster touching it, any snapshot's L2 table). This
module reads the refcount table and blocks and takes that census; the image combines
them (:meth:`.image.Qcow2Image.map`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import CorruptImageError
from vmreclaim.core.formats import ImageFile
from vmreclaim.plugins.formats.qcow2 import header as hdr
from vmreclaim.plugins.formats.qcow2.header import Header, Snapshot
from vmreclaim.plugins.formats.qcow2.tables import Tables, l2_offsets

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


class Refcounts:
    """The refcount table (read and validated at once) and its blocks, read lazily."""

    def __init__(self, file: ImageFile, header: Header) -> None:
        self.file = file
        self.header = header
        self._cs = header.cluster_size
        self._blocks: dict[int, npt.NDArray[np.uint8]] = {}
        self.table = self._read_table()

    def _read_table(self) -> U64:
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

    def block_offsets(self) -> I64:
        """Host offsets of every refcount block the table names."""
        blocks: I64 = (self.table & np.uint64(hdr.REFT_OFFSET_MASK)).astype(np.int64)
        present: I64 = blocks[blocks != 0]
        return present

    def of(self, clusters: I64) -> npt.NDArray[np.int64]:
        """Refcounts of host ``clusters`` (0 where no refcount block covers them)."""
        bits = self.header.refcount_bits
        per_block = self._cs * 8 // bits
        block_idx, within = np.divmod(clusters, per_block)
        out = np.zeros(clusters.size, dtype=np.int64)
        for b in np.unique(block_idx).tolist():
            if b >= self.table.size:
                continue
            block = self._block(b)
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

    def _block(self, index: int) -> npt.NDArray[np.uint8] | None:
        if index not in self._blocks:
            off = int(self.table[index] & np.uint64(hdr.REFT_OFFSET_MASK))
            if not off:
                return None
            self._blocks[index] = np.frombuffer(
                self.file.read(off, self._cs, "qcow2 refcount block"), dtype=np.uint8
            )
        return self._blocks[index]


@dataclass(frozen=True)
class Census:
    """Host clusters referenced other than once, exclusively, from the active L1."""

    #: Sorted host cluster indices that a data cluster must not be: referenced twice
    #: from the active tables, touched by a compressed cluster, or used by a snapshot.
    shared: I64
    #: Host cluster indices of every L2 table named by a snapshot L1 (metadata).
    snapshot_l2: I64


def take_census(tables: Tables, snapshots: list[Snapshot]) -> Census:
    """Count the references of the active tables and of every snapshot's tables."""
    bits = tables.header.cluster_bits
    active_plain, active_packed = tables.references(l2_offsets(tables.l1))
    values, counts = np.unique(active_plain, return_counts=True)
    shared = [values[counts > 1], active_packed]
    snap_l2: list[I64] = []
    for l1 in tables.snapshot_l1s(snapshots):
        named = np.unique(l2_offsets(l1))
        plain, packed = tables.references(named)
        shared += [plain, packed]
        snap_l2.append(named >> bits)
    empty = np.zeros(0, dtype=np.int64)
    return Census(
        np.unique(np.concatenate(shared)),
        np.unique(np.concatenate(snap_l2)) if snap_l2 else empty,
    )
