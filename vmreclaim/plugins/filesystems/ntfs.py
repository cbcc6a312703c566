"""Driver ``ntfs``: free clusters of NTFS from the ``$Bitmap`` metafile, found through ``$MFT``.

NTFS (the Linux-NTFS project's documentation, ntfs-3g and the kernel's ntfs3 describe it)
keeps one bit per cluster in the unnamed data stream of MFT record 6, ``$Bitmap``. To
reach it this driver parses the boot sector, reads MFT record 0 at the boot sector's
``$MFT`` cluster, decodes that record's data runlist (the MFT's own map) and through it
reads records 2, 3 and 6. Before a cluster is called free:

* every MFT record read must carry the ``FILE`` magic and pass its *update sequence*
  (fixup) check — a record torn by an interrupted write fails it;
* records 0–3 must equal their copies in ``$MFTMirr`` (ntfs-3g refuses to mount otherwise);
* ``$Volume`` must not be flagged dirty, and ``$LogFile``'s newest restart area must say
  the log holds nothing to redo (Windows' fast startup and hibernation leave it unclean,
  as does any crash); a ``CHKD`` restart page means chkdsk was interrupted; a root
  ``hiberfil.sys`` starting with ``hibr`` means Windows will resume from memory;
* the runlists must stay inside the volume and have no holes, and the bitmap must cover
  every cluster;
* every cluster of ``$Boot``, ``$MFT``, ``$MFTMirr``, ``$LogFile`` and ``$Bitmap`` itself
  must be marked in use — a bitmap that frees the filesystem's own structures is wrong.

A metafile whose data stream continues in extension records (an ``$ATTRIBUTE_LIST``
with the stream split) is refused as unsupported; no such volume was met in testing.
Why hand-written: no maintained, permissively licensed Python NTFS reader verifies
fixups and the mirror (``dissect.ntfs`` is AGPL-3.0; ``pytsk3`` reads files, not
allocation state, and trusts what it finds).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

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

_STRIDE = 512  # update-sequence protection covers every 512 bytes, whatever the sector
_AT_DATA = 0x80
_AT_VOLUME_INFORMATION = 0x70
_AT_ATTRIBUTE_LIST = 0x20
_AT_FILE_NAME = 0x30
_ROOT_DIRECTORY = 5
_AT_END = 0xFFFFFFFF
_VOLUME_IS_DIRTY = 0x0001
_RESTART_VOLUME_IS_CLEAN = 0x0002
_LOGFILE_NO_CLIENT = 0xFFFF
_MAX_RUNS = 1 << 20

Run = tuple[int, int, int]  # (vcn, lcn, clusters)


@dataclass(frozen=True)
class _Boot:
    sector: int
    cluster: int
    clusters: int
    mft_lcn: int
    mirr_lcn: int
    record: int


def _parse_boot(boot: bytes, where: str) -> _Boot:
    sector, spc = struct.unpack_from("<HB", boot, 0x0B)
    (total_sectors, mft_lcn, mirr_lcn) = struct.unpack_from("<QQQ", boot, 0x28)
    (cpr,) = struct.unpack_from("<b", boot, 0x40)
    if boot[510:512] != b"\x55\xaa" or sector not in (512, 1024, 2048, 4096):
        raise CorruptImageError(f"{where}: ntfs boot sector: signature or {sector}-byte sectors")
    sectors = 1 << (256 - spc) if spc > 0x80 else spc
    if sectors == 0 or sectors & (sectors - 1) or sector * sectors > 2 * 1024 * 1024:
        raise CorruptImageError(f"{where}: ntfs boot sector: {spc:#x} sectors per cluster")
    cluster = sector * sectors
    record = cpr * cluster if cpr > 0 else 1 << -cpr if cpr > -31 else 0
    if record < _STRIDE or record > 65536 or record & (record - 1):
        raise CorruptImageError(f"{where}: ntfs boot sector: {record}-byte MFT records")
    clusters = total_sectors // sectors
    if not (0 < mft_lcn < clusters and 0 < mirr_lcn < clusters):
        raise CorruptImageError(f"{where}: ntfs boot sector: $MFT at {mft_lcn}, $MFTMirr at {mirr_lcn}")
    return _Boot(sector, cluster, clusters, mft_lcn, mirr_lcn, record)


class _Ntfs:
    """One NTFS volume being read; every method raises on the first inconsistency."""

    def __init__(self, volume: Volume, boot: _Boot, where: str) -> None:
        self.volume, self.boot, self.where = volume, boot, where
        self.mft_runs: list[Run] = []

    def fail(self, what: str) -> CorruptImageError:
        return CorruptImageError(f"{self.where}: ntfs: {what}")

    # -- MFT records -------------------------------------------------------------------

    def fixup(self, raw: bytes, magic: bytes, what: str) -> bytes:
        """Apply (and check) the update sequence of a multi-sector protected structure."""
        if raw[:4] != magic:
            raise self.fail(f"{what} has no {magic.decode()} magic")
        usa_ofs, usa_count = struct.unpack_from("<HH", raw, 4)
        strides = len(raw) // _STRIDE
        if usa_count != strides + 1 or usa_ofs % 2 or usa_ofs + 2 * usa_count > _STRIDE:
            raise self.fail(f"{what} has an invalid update sequence array")
        usa = raw[usa_ofs : usa_ofs + 2 * usa_count]
        out = bytearray(raw)
        for i in range(strides):
            end = (i + 1) * _STRIDE
            if out[end - 2 : end] != usa[:2]:
                raise self.fail(f"{what} fails its update sequence check (torn write)")
            out[end - 2 : end] = usa[2 + 2 * i : 4 + 2 * i]
        return bytes(out)

    def record_at(self, offset: int, number: int, what: str) -> bytes:
        return self.check_record(self.volume.read(offset, self.boot.record, what), number, what)

    def check_record(self, raw: bytes, number: int, what: str, *, extension_ok: bool = False) -> bytes:
        rec = self.fixup(raw, b"FILE", what)
        attrs, flags, in_use, allocated = struct.unpack_from("<HHII", rec, 20)
        (base,) = struct.unpack_from("<Q", rec, 32)
        if not flags & 1 or (base != 0 and not extension_ok):
            raise self.fail(f"{what} is not an in-use base record")
        if allocated != self.boot.record or not 48 <= attrs < in_use <= allocated:
            raise self.fail(f"{what} has an impossible layout")
        (said,) = struct.unpack_from("<I", rec, 44)
        if attrs >= 56 and said != number:  # NTFS 3.1 records name themselves
            raise self.fail(f"{what} says it is record {said}")
        return rec

    def record(self, number: int) -> bytes:
        offset = number * self.boot.record
        data = self.read_runs(self.mft_runs, offset, self.boot.record, f"MFT record {number}")
        return self.check_record(data, number, f"MFT record {number}")

    def attributes(self, rec: bytes, number: int) -> list[tuple[int, int, bytes]]:
        """``(type, name_length, raw attribute)`` for each attribute of a record."""
        (pos,) = struct.unpack_from("<H", rec, 20)
        (in_use,) = struct.unpack_from("<I", rec, 24)
        out: list[tuple[int, int, bytes]] = []
        while True:
            if pos + 4 > in_use:
                raise self.fail(f"MFT record {number}: attributes run past the record's end")
            (kind,) = struct.unpack_from("<I", rec, pos)
            if kind == _AT_END:
                return out
            (length,) = struct.unpack_from("<I", rec, pos + 4)
            if length < 24 or length % 8 or pos + length > in_use:
                raise self.fail(f"MFT record {number}: attribute {kind:#x} has length {length}")
            out.append((kind, rec[pos + 9], rec[pos : pos + length]))
            pos += length

    def data_stream(self, rec: bytes, number: int) -> tuple[list[Run], int] | bytes:
        """The unnamed ``$DATA`` of a record: its runs and size, or its resident bytes."""
        attrs = self.attributes(rec, number)
        found = [a for kind, name_len, a in attrs if kind == _AT_DATA and name_len == 0]
        if len(found) != 1:
            has_list = any(kind == _AT_ATTRIBUTE_LIST for kind, _, _ in attrs)
            raise (UnsupportedImageError if has_list else CorruptImageError)(
                f"{self.where}: ntfs: MFT record {number} has {len(found)} unnamed data streams"
                + (" in its base record (an attribute list splits it)" if has_list else "")
            )
        attr = found[0]
        if attr[8] == 0:
            value_len, value_ofs = struct.unpack_from("<IH", attr, 16)
            if value_ofs + value_len > len(attr):
                raise self.fail(f"MFT record {number}: resident data overruns its attribute")
            return attr[value_ofs : value_ofs + value_len]
        (flags,) = struct.unpack_from("<H", attr, 12)
        lowest, highest, pairs_ofs = struct.unpack_from("<QQH", attr, 16)
        allocated, size, initialized = struct.unpack_from("<QQQ", attr, 40)
        if flags & 0xC0FF:
            raise UnsupportedImageError(
                f"{self.where}: ntfs: MFT record {number} data is compressed/encrypted/sparse"
            )
        runs = self.decode_runs(attr[pairs_ofs:], number)
        cluster = self.boot.cluster
        total = sum(r[2] for r in runs)
        if lowest != 0 or highest + 1 != total or allocated != total * cluster:
            raise UnsupportedImageError(
                f"{self.where}: ntfs: MFT record {number} data stream continues outside its base record"
            )
        if not initialized <= size <= allocated or initialized < size:
            raise self.fail(f"MFT record {number}: data sizes {initialized}/{size}/{allocated} disagree")
        return runs, size

    def decode_runs(self, pairs: bytes, number: int, *, sparse_ok: bool = False) -> list[Run]:
        """Runs of a mapping-pairs array; holes are skipped when ``sparse_ok`` (user
        files), refused otherwise (metafiles)."""
        runs: list[Run] = []
        pos = vcn = lcn = 0
        while pos < len(pairs) and pairs[pos]:
            header = pairs[pos]
            nlen, nofs = header & 0xF, header >> 4
            if not 1 <= nlen <= 8 or nofs > 8 or pos + 1 + nlen + nofs > len(pairs) or len(runs) > _MAX_RUNS:
                raise self.fail(f"MFT record {number}: runlist is malformed")
            length = int.from_bytes(pairs[pos + 1 : pos + 1 + nlen], "little")
            if nofs == 0:
                if not sparse_ok:
                    raise UnsupportedImageError(
                        f"{self.where}: ntfs: MFT record {number} data has a sparse run"
                    )
                vcn += length
                pos += 1 + nlen
                continue
            lcn += int.from_bytes(pairs[pos + 1 + nlen : pos + 1 + nlen + nofs], "little", signed=True)
            if length <= 0 or lcn < 0 or lcn + length > self.boot.clusters:
                raise self.fail(f"MFT record {number}: a run [{lcn}, +{length}) lies outside the volume")
            runs.append((vcn, lcn, length))
            vcn += length
            pos += 1 + nlen + nofs
        if pos >= len(pairs):
            raise self.fail(f"MFT record {number}: runlist has no terminator")
        return runs

    def read_runs(self, runs: list[Run], offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at byte ``offset`` of a stream mapped by ``runs``."""
        cluster = self.boot.cluster
        out = bytearray()
        for vcn, lcn, count in runs:
            lo, hi = vcn * cluster, (vcn + count) * cluster
            a, b = max(lo, offset), min(hi, offset + length)
            if a < b:
                out += self.volume.read(lcn * cluster + (a - lo), b - a, what)
        if len(out) != length:
            raise self.fail(f"{what} lies outside its stream's runs")
        return bytes(out)


def _is_hiberfil(attr: bytes) -> bool:
    """A resident ``$FILE_NAME`` naming ``hiberfil.sys`` in the root directory."""
    if attr[8] != 0:
        return False
    value_len, value_ofs = struct.unpack_from("<IH", attr, 16)
    value = attr[value_ofs : value_ofs + value_len]
    if len(value) < 66 or struct.unpack_from("<Q", value)[0] & 0xFFFFFFFFFFFF != _ROOT_DIRECTORY:
        return False
    name = value[66 : 66 + 2 * value[64]].decode("utf-16-le", "replace")
    return name.lower() == "hiberfil.sys"


def _check_not_hibernated(fs: _Ntfs, rec: bytes, number: int) -> None:
    """Windows hibernation (and fast startup) writes a ``hibr`` signature at the start
    of ``hiberfil.sys`` (ntfs-3g refuses to mount such a volume read-write): the
    filesystem state on disk is not the state Windows will resume with."""
    head = b""
    for kind, name_len, attr in fs.attributes(rec, number):
        if kind != _AT_DATA or name_len != 0:
            continue
        if attr[8] == 0:
            value_len, value_ofs = struct.unpack_from("<IH", attr, 16)
            head = attr[value_ofs : value_ofs + min(4, value_len)]
        else:
            (pairs_ofs,) = struct.unpack_from("<H", attr, 32)
            runs = fs.decode_runs(attr[pairs_ofs:], number, sparse_ok=True)
            if runs and runs[0][0] == 0:  # VCN 0 is stored (not a hole)
                head = fs.volume.read(runs[0][1] * fs.boot.cluster, 4, "hiberfil.sys")
    if head.lower() == b"hibr":
        raise fs.fail("Windows is hibernated (hiberfil.sys holds a hibernation image; fast startup?)")


def _runs_mask(runs: list[Run]) -> list[tuple[int, int]]:
    return [(lcn, lcn + count) for _, lcn, count in runs]


class NtfsReader(FilesystemReader):
    """NTFS, detected from its boot sector (OEM id ``NTFS    ``)."""

    capabilities: ClassVar[FilesystemCapabilities] = FilesystemCapabilities(free_space=True)

    def probe(self, volume: Volume) -> Detection | None:
        if volume.length < 512:
            return None
        boot = volume.read(0, 512, "ntfs boot sector")
        if boot[3:11] != b"NTFS    ":
            return None
        bytes_per_sector, spc = struct.unpack_from("<HB", boot, 0x0B)
        # Sectors per cluster above 0x80 encode a power of two: 2 ** (256 - value).
        sectors = 1 << (256 - spc) if spc > 0x80 else spc
        (serial,) = struct.unpack_from("<Q", boot, 0x48)
        return Detection("ntfs", bytes_per_sector * sectors or None, uuid=f"{serial:016X}")

    def free_space(
        self,
        volume: Volume,
        detection: Detection,
        progress: ProgressCallback | None = None,
        *,
        estimate: bool = False,  # read as in a real run: nothing stale is relaxed here
    ) -> FreeSpace:
        where = f"{volume.image.file.path}: {volume.label}"
        boot = _parse_boot(volume.read(0, 512, "ntfs boot sector"), where)
        size = boot.clusters * boot.cluster
        if size > volume.length:
            raise CorruptImageError(f"{where}: ntfs spans {size} bytes but the volume holds {volume.length}")
        fs = _Ntfs(volume, boot, where)
        rec0 = fs.record_at(boot.mft_lcn * boot.cluster, 0, "MFT record 0 ($MFT)")
        mft = fs.data_stream(rec0, 0)
        if isinstance(mft, bytes) or mft[0][0][1] != boot.mft_lcn:
            raise fs.fail("$MFT's data does not start where the boot sector says")
        fs.mft_runs = mft[0]
        records = {0: rec0} | {n: fs.record(n) for n in (1, 2, 3, 6)}
        self._check_mirror(fs, records)
        if progress is not None:
            progress(1, 3)
        self._check_volume_clean(fs, records[3])
        self._check_logfile_clean(fs, records[2])
        bitmap_stream = fs.data_stream(records[6], 6)
        need = (boot.clusters + 7) // 8
        if isinstance(bitmap_stream, bytes):
            bitmap, bitmap_runs = bitmap_stream, []
        else:
            runs, stream_size = bitmap_stream
            if stream_size < need:
                raise fs.fail(f"$Bitmap holds {stream_size} bytes, {need} are needed")
            bitmap, bitmap_runs = fs.read_runs(runs, 0, need, "$Bitmap"), runs
        if len(bitmap) < need:
            raise fs.fail(f"$Bitmap holds {len(bitmap)} bytes, {need} are needed")
        if progress is not None:
            progress(2, 3)
        used = np.unpackbits(np.frombuffer(bitmap[:need], dtype=np.uint8), bitorder="little")[: boot.clusters]
        self._check_metafiles_used(fs, used, records, bitmap_runs)
        claimed = self._claimed_by_files(fs, progress)
        if np.any(claimed & (used == 0)):
            first = int(np.flatnonzero(claimed & (used == 0))[0])
            raise fs.fail(f"$Bitmap marks cluster {first} free, but an MFT record's runlist uses it")
        free_mask = np.concatenate(([0], (used == 0).astype(np.int8), [0]))
        edges = np.diff(free_mask)
        starts = np.flatnonzero(edges == 1).astype(np.int64)
        ends = np.flatnonzero(edges == -1).astype(np.int64)
        if progress is not None:
            progress(3, 3)
        return FreeSpace(RangeSet(starts * boot.cluster, ends * boot.cluster), boot.cluster, size)

    @staticmethod
    def _check_mirror(fs: _Ntfs, records: dict[int, bytes]) -> None:
        mirr = fs.record_at(fs.boot.mirr_lcn * fs.boot.cluster, 0, "$MFTMirr record 0")
        mirror_stream = fs.data_stream(records[1], 1)
        if isinstance(mirror_stream, bytes):
            raise fs.fail("$MFTMirr has resident data")
        runs = mirror_stream[0]
        if runs[0][1] != fs.boot.mirr_lcn:
            raise fs.fail("$MFTMirr's data does not start where the boot sector says")
        copies = min(4, mirror_stream[1] // fs.boot.record)
        for n in range(copies):
            raw = mirr if n == 0 else fs.read_runs(runs, n * fs.boot.record, fs.boot.record, f"$MFTMirr {n}")
            copy = raw if n == 0 else fs.fixup(raw, b"FILE", f"$MFTMirr record {n}")
            original = records[n]
            (in_use,) = struct.unpack_from("<I", original, 24)
            if copy[:in_use] != original[:in_use]:
                raise fs.fail(f"$MFTMirr does not match $MFT (record {n})")

    @staticmethod
    def _check_volume_clean(fs: _Ntfs, rec: bytes) -> None:
        info = [a for kind, _, a in fs.attributes(rec, 3) if kind == _AT_VOLUME_INFORMATION]
        if len(info) != 1 or info[0][8] != 0:
            raise fs.fail("$Volume has no resident volume information")
        value_len, value_ofs = struct.unpack_from("<IH", info[0], 16)
        if value_len < 12 or value_ofs + 12 > len(info[0]):
            raise fs.fail("$Volume information is too short")
        major, _minor, flags = struct.unpack_from("<BBH", info[0], value_ofs + 8)
        if major not in (1, 3):
            raise UnsupportedImageError(f"{fs.where}: ntfs: volume version {major}.x is not read")
        if flags & _VOLUME_IS_DIRTY:
            raise fs.fail("the volume is marked dirty (run chkdsk, or ntfsfix -d)")

    @staticmethod
    def _check_logfile_clean(fs: _Ntfs, rec: bytes) -> None:
        stream = fs.data_stream(rec, 2)
        if isinstance(stream, bytes):
            raise fs.fail("$LogFile has resident data")
        runs, size = stream
        head = fs.read_runs(runs, 0, min(size, 8192), "$LogFile restart pages")
        if head == b"\xff" * len(head):
            return  # emptied (as ntfs-3g and mkntfs leave it): nothing to redo
        newest: tuple[int, int, int] | None = None
        if head[:4] == b"CHKD":
            raise fs.fail("$LogFile says chkdsk was interrupted")
        (page_size,) = struct.unpack_from("<I", head, 16) if head[:4] == b"RSTR" else (0,)
        if page_size not in (4096, 8192, 16384, 32768, 65536) or 2 * page_size > size:
            raise fs.fail("$LogFile has no valid restart page")
        for i in range(2):
            raw = fs.read_runs(runs, i * page_size, page_size, f"$LogFile restart page {i}")
            if raw[:4] != b"RSTR":
                continue
            page = fs.fixup(raw, b"RSTR", f"$LogFile restart page {i}")
            (area,) = struct.unpack_from("<H", page, 24)
            if area + 16 > page_size:
                raise fs.fail(f"$LogFile restart page {i} has an invalid restart area offset")
            lsn, _clients, _free, in_use, flags = struct.unpack_from("<QHHHH", page, area)
            if newest is None or lsn > newest[0]:
                newest = (lsn, in_use, flags)
        if newest is None:
            raise fs.fail("$LogFile has no valid restart page")
        if newest[1] != _LOGFILE_NO_CLIENT and not newest[2] & _RESTART_VOLUME_IS_CLEAN:
            raise fs.fail(
                "$LogFile is not clean (the volume was not shut down cleanly, or Windows "
                "hibernated it / used fast startup); it needs Windows to replay it"
            )

    @staticmethod
    def _claimed_by_files(fs: _Ntfs, progress: ProgressCallback | None) -> np.ndarray:
        """Every cluster some in-use MFT record (base or extension) maps, as a mask.

        The bitmap has no checksum; this is chkdsk's cross-check, so that a bitmap bit
        cleared by damage cannot free a cluster a file still holds.
        """
        boot = fs.boot
        mft_bytes = sum(count for _, _, count in fs.mft_runs) * boot.cluster
        total = mft_bytes // boot.record
        delta = np.zeros(boot.clusters + 1, dtype=np.int64)
        chunk = max(1, (8 << 20) // boot.record)
        for first in range(0, total, chunk):
            count = min(chunk, total - first)
            raw = fs.read_runs(fs.mft_runs, first * boot.record, count * boot.record, "$MFT")
            for i in range(count):
                rec = raw[i * boot.record : (i + 1) * boot.record]
                if rec[:4] != b"FILE" or not struct.unpack_from("<H", rec, 22)[0] & 1:
                    continue  # free record slot: its stale runlists claim nothing
                n = first + i
                fixed = fs.check_record(rec, n, f"MFT record {n}", extension_ok=True)
                attrs = fs.attributes(fixed, n)
                if any(kind == _AT_FILE_NAME and _is_hiberfil(a) for kind, _, a in attrs):
                    _check_not_hibernated(fs, fixed, n)
                for _kind, _, attr in attrs:
                    if attr[8] == 0:
                        continue
                    (pairs_ofs,) = struct.unpack_from("<H", attr, 32)
                    for _vcn, lcn, length in fs.decode_runs(attr[pairs_ofs:], n, sparse_ok=True):
                        delta[lcn] += 1
                        delta[lcn + length] -= 1
            if progress is not None:
                progress(first + count, total)
        return np.cumsum(delta[:-1]) > 0

    @staticmethod
    def _check_metafiles_used(
        fs: _Ntfs, used: np.ndarray, records: dict[int, bytes], bitmap_runs: list[Run]
    ) -> None:
        must = [(0, max(1, 8192 // fs.boot.cluster))]  # $Boot: the first 8 KiB
        must += _runs_mask(fs.mft_runs) + _runs_mask(bitmap_runs)
        for n in (1, 2):
            stream = fs.data_stream(records[n], n)
            if not isinstance(stream, bytes):
                must += _runs_mask(stream[0])
        for a, b in must:
            if not used[a:b].all():
                raise fs.fail(f"$Bitmap marks clusters of a system file ([{a}, {b})) free")
