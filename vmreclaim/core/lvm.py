"""LVM2 physical volumes: their logical volumes, read from the on-disk text metadata.

The format (lvm2's ``lib/format_text``, ``lib/label``): one of a PV's first four sectors
holds a *label* (``LABELONE``, CRC-checked) whose PV header names the PV's UUID, its data
area and its metadata areas. Each metadata area starts with an *mda header* (magic,
CRC-checked) whose first location points at the current metadata text inside a ring
buffer (it may wrap around to just after the header); the text has its own CRC. A PV
usually has one metadata area at its start and may have a second at its end; the copy
with the highest ``seqno`` wins, and two copies with the same ``seqno`` must be
identical.

The text describes the volume group: extent size, the PVs (``pe_start``, ``pe_count``)
and each LV's segments. A *linear* LV (segment type ``striped`` with one stripe) whose
segments all lie on this PV and are contiguous on it becomes a :class:`Volume` that the
filesystem readers read like a partition. Everything else is listed with the reason it
is skipped: other segment types (thin, raid, mirror, cache, snapshot), the origin of a
snapshot (the snapshot still reads the origin's unchanged blocks, so freeing them
would change it), LVs spread over several pieces or other PVs.

lvm2's checksum is a CRC-32 (the zlib polynomial) started from ``0xf597a6cf`` without
the final inversion; zlib computes it with the start and result inverted.
"""

from __future__ import annotations

import itertools
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from vmreclaim.core.errors import CorruptImageError

SECTOR = 512

_INITIAL_CRC = 0xF597A6CF
_MDA_MAGIC = b" LVM2 x[5A%r0N*>"
_MDA_HEADER_SIZE = 512
_RAW_LOCN_IGNORED = 0x1
#: Metadata text larger than this is refused (lvm2's default area is 1 MiB).
MAX_METADATA = 64 * 1024 * 1024

Value: TypeAlias = "int | str | list[Value] | dict[str, Value]"


def lvm_crc(data: bytes, initial: int = _INITIAL_CRC) -> int:
    """lvm2's ``calc_crc``."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


class MetadataError(CorruptImageError):
    """The PV's label or metadata cannot be trusted; the PV is skipped with this reason
    (a corrupt-image error, exit 4, wherever it is not caught as a skip)."""


#: ``read(offset, length, what)``: bytes of the physical volume (``Volume.read``).
Reader = Callable[[int, int, str], bytes]


@dataclass
class LogicalVolume:
    """A logical volume as a byte range of its physical volume, or why it is skipped."""

    name: str
    offset: int = 0
    length: int = 0
    skip_reason: str | None = None


@dataclass(frozen=True)
class _Metadata:
    seqno: int
    text: bytes


def logical_volumes(read: Reader, pv_length: int) -> list[LogicalVolume]:
    """The logical volumes of a physical volume, readable ones without a skip reason.

    Raises :class:`MetadataError` when the label or every metadata copy fails a check,
    or when the metadata contradicts itself (LVs sharing extents, extents past the PV).
    """
    pv_uuid, mdas = _label(read, pv_length)
    copies = [m for m in (_metadata(read, offset) for offset in mdas) if m is not None]
    if not copies:
        raise MetadataError("no metadata area holds valid metadata")
    newest = max(c.seqno for c in copies)
    texts = {c.text for c in copies if c.seqno == newest}
    if len(texts) != 1:
        raise MetadataError(f"two metadata copies with seqno {newest} differ")
    doc = parse(texts.pop().rstrip(b"\0").decode("utf-8", "strict"))
    vgs = [(k, v) for k, v in doc.items() if isinstance(v, dict)]
    if len(vgs) != 1:
        raise MetadataError(f"metadata describes {len(vgs)} volume groups")
    vg_name, vg = vgs[0]
    if vg.get("seqno") != newest:
        raise MetadataError(f"metadata text says seqno {vg.get('seqno')}, its area header {newest}")
    return _volumes(pv_length, pv_uuid, vg_name, vg)


def _label(read: Reader, pv_length: int) -> tuple[str, list[int]]:
    for i in range(4):
        if (i + 1) * SECTOR > pv_length:
            break
        label = read(i * SECTOR, SECTOR, "LVM2 label")
        if label[:8] != b"LABELONE":
            continue
        sector, crc, offset = struct.unpack_from("<QII", label, 8)
        if sector != i or lvm_crc(label[20:]) != crc or label[24:32] != b"LVM2 001":
            raise MetadataError(f"label in sector {i} fails its checks (sector number, CRC or type)")
        if not 32 <= offset <= SECTOR - 48:
            raise MetadataError(f"label in sector {i}: PV header offset {offset}")
        pv_uuid = label[offset : offset + 32].decode("ascii", "replace")
        pos = offset + 40
        areas: list[list[tuple[int, int]]] = [[], []]
        for which in (0, 1):
            while True:
                if pos + 16 > SECTOR:
                    raise MetadataError("PV header area lists run past the label sector")
                start, size = struct.unpack_from("<QQ", label, pos)
                pos += 16
                if start == 0:
                    break
                areas[which].append((start, size))
        return pv_uuid, [start for start, _ in areas[1]]
    raise MetadataError("no LABELONE label in the first four sectors")


def _metadata(read: Reader, mda: int) -> _Metadata | None:
    hdr = read(mda, _MDA_HEADER_SIZE, "LVM2 metadata area header")
    (crc,) = struct.unpack_from("<I", hdr)
    version, start, size = struct.unpack_from("<IQQ", hdr, 20)
    if hdr[4:20] != _MDA_MAGIC or lvm_crc(hdr[4:]) != crc or version != 1 or start != mda:
        raise MetadataError(f"metadata area header at byte {mda} fails its checks (magic, CRC or start)")
    offset, length, text_crc, flags = struct.unpack_from("<QQII", hdr, 40)
    if flags & _RAW_LOCN_IGNORED or offset == 0:
        return None  # an ignored or empty metadata area (pvcreate --metadataignore)
    if not _MDA_HEADER_SIZE <= offset < size or not 0 < length <= min(size - _MDA_HEADER_SIZE, MAX_METADATA):
        raise MetadataError(f"metadata area at byte {mda}: text at {offset} (+{length}) does not fit")
    first = min(length, size - offset)
    text = read(mda + offset, first, "LVM2 metadata text")
    if first < length:  # the ring buffer wraps to just after the header
        text += read(mda + _MDA_HEADER_SIZE, length - first, "LVM2 metadata text")
    if lvm_crc(text) != text_crc:
        raise MetadataError(f"metadata text in the area at byte {mda} fails its CRC")
    m = re.search(rb"\bseqno\s*=\s*(\d+)", text)
    if m is None:
        raise MetadataError(f"metadata text in the area at byte {mda} has no seqno")
    return _Metadata(int(m.group(1)), text)


# -- the text format ----------------------------------------------------------------------

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{}\[\],=]|[^\s{}\[\],="#]+', re.S)


def parse(text: str) -> dict[str, Value]:
    """Parse lvm2's configuration-style metadata text into nested dicts and lists."""
    tokens = [t for t in _TOKEN.findall(text) if t.strip() and not t.startswith("#")]
    if "".join(_TOKEN.findall(text)) != text:
        raise MetadataError("metadata text has characters outside the format")
    pos = 0

    def value() -> Value:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "[":
            items: list[Value] = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        if tok.startswith('"'):
            return re.sub(r"\\(.)", r"\1", tok[1:-1])
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        raise MetadataError(f"metadata text: unexpected {tok!r}")

    def section(depth: int) -> dict[str, Value]:
        nonlocal pos
        out: dict[str, Value] = {}
        while pos < len(tokens) and tokens[pos] != "}":
            key = tokens[pos]
            if depth > 16 or key in "{}[],=" or pos + 1 >= len(tokens):
                raise MetadataError(f"metadata text: unexpected {key!r}")
            if tokens[pos + 1] == "=":
                pos += 2
                out[key] = value()
            elif tokens[pos + 1] == "{":
                pos += 2
                out[key] = section(depth + 1)
                if pos >= len(tokens):
                    raise MetadataError("metadata text: unclosed section")
                pos += 1
            else:
                raise MetadataError(f"metadata text: unexpected {tokens[pos + 1]!r} after {key!r}")
        return out

    try:
        doc = section(0)
    except IndexError:
        raise MetadataError("metadata text ends early") from None
    if pos != len(tokens):
        raise MetadataError("metadata text: unbalanced '}'")
    return doc


# -- volumes -------------------------------------------------------------------------------


def _int(d: dict[str, Value], key: str, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or v < 0:
        raise MetadataError(f"{where}: {key} is {v!r}")
    return v


def _volumes(pv_length: int, pv_uuid: str, vg_name: str, vg: dict[str, Value]) -> list[LogicalVolume]:
    extent = _int(vg, "extent_size", vg_name) * SECTOR
    pvs = vg.get("physical_volumes")
    lvs = vg.get("logical_volumes", {})
    if extent == 0 or not isinstance(pvs, dict) or not isinstance(lvs, dict):
        raise MetadataError(f"volume group {vg_name}: no extent size or physical volumes")
    mine = [
        k for k, p in pvs.items() if isinstance(p, dict) and str(p.get("id", "")).replace("-", "") == pv_uuid
    ]
    if len(mine) != 1:
        raise MetadataError(f"volume group {vg_name} does not list this PV ({pv_uuid}) exactly once")
    me = pvs[mine[0]]
    assert isinstance(me, dict)
    pe_start = _int(me, "pe_start", mine[0]) * SECTOR
    pe_count = _int(me, "pe_count", mine[0])
    if pe_start + pe_count * extent > pv_length:
        raise MetadataError(f"{mine[0]}: {pe_count} extents from byte {pe_start} exceed the PV")
    # Names other LVs' segments mention (snapshot origins, pool data and metadata, raid
    # images, cache origins): such an LV is part of another one, never read on its own.
    referenced: set[str] = set()
    for lv in lvs.values():
        for seg in lv.values() if isinstance(lv, dict) else ():
            if isinstance(seg, dict) and seg.get("type") != "striped":
                referenced |= set(_strings(seg))
    out = []
    taken: list[tuple[int, int, str]] = []
    for name, lv in lvs.items():
        if not isinstance(lv, dict):
            continue
        full = f"{vg_name}/{name}"
        vol = LogicalVolume(full)
        out.append(vol)
        status = lv.get("status")
        try:
            pieces = _pieces(lv, full, mine[0], pe_count)
        except _Skip as why:
            vol.skip_reason = f"LVM2 logical volume {full}: {why}"
            continue
        taken += [(pe_start + pe * extent, pe_start + (pe + n) * extent, full) for pe, n in pieces]
        first, count = pieces[0]
        vol.offset, vol.length = pe_start + first * extent, count * extent
        if name in referenced:
            vol.skip_reason = f"LVM2 logical volume {full} is a component or snapshot origin of another LV"
        elif not isinstance(status, list) or "VISIBLE" not in status:
            vol.skip_reason = f"LVM2 logical volume {full} is hidden (an internal volume)"
        elif len(pieces) != 1:
            vol.skip_reason = (
                f"LVM2 logical volume {full} lies in {len(pieces)} separate pieces of its PV; "
                "only contiguous linear volumes are read"
            )
    taken.sort()
    for (_, a_end, a), (b_start, _, b) in itertools.pairwise(taken):
        if b_start < a_end:
            raise MetadataError(f"logical volumes {a} and {b} share extents")
    return sorted(out, key=lambda v: (v.skip_reason is not None, v.offset))


def _strings(value: Value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


class _Skip(Exception):
    pass


def _pieces(lv: dict[str, Value], name: str, me: str, pe_count: int) -> list[tuple[int, int]]:
    """The LV's PV extent runs, in LV order, merged where contiguous."""
    segments = sorted(
        (seg for key, seg in lv.items() if key.startswith("segment") and isinstance(seg, dict)),
        key=lambda s: s.get("start_extent", -1),  # type: ignore[arg-type,return-value]
    )
    if not segments or len(segments) != lv.get("segment_count"):
        raise MetadataError(f"logical volume {name}: segment_count disagrees with its segments")
    pieces: list[tuple[int, int]] = []
    next_le = 0
    for seg in segments:
        kind = seg.get("type")
        if kind != "striped" or seg.get("stripe_count") != 1:
            raise _Skip(f"segment type {kind!r}" + (" with several stripes" if kind == "striped" else ""))
        stripes = seg.get("stripes")
        start, count = _int(seg, "start_extent", name), _int(seg, "extent_count", name)
        if start != next_le or count == 0:
            raise MetadataError(f"logical volume {name}: segments leave a gap or overlap at extent {start}")
        if not isinstance(stripes, list) or len(stripes) != 2 or not isinstance(stripes[1], int):
            raise MetadataError(f"logical volume {name}: malformed stripes {stripes!r}")
        if stripes[0] != me:
            raise _Skip(f"has extents on another physical volume ({stripes[0]})")
        pe = stripes[1]
        if pe < 0 or pe + count > pe_count:
            raise MetadataError(f"logical volume {name}: extents [{pe}, +{count}) outside the PV")
        if pieces and pieces[-1][0] + pieces[-1][1] == pe:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + count)
        else:
            pieces.append((pe, count))
        next_le = start + count
    return pieces
