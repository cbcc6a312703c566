"""Helpers for the format tests: real images made with QEMU's tools, QEMU as the oracle,
and a VHD writer that follows the specification (for what QEMU cannot make:
differencing disks, partial sector bitmaps, other creators, saved state)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmreclaim.cli import main
from vmreclaim.core.extents import ExtentKind, ExtentMap
from vmreclaim.core.opening import open_image
from vmreclaim.core.ranges import ByteRange
from vmreclaim.testing import require_tool

KiB = 1024
MiB = 1024 * KiB


# -- QEMU's tools ---------------------------------------------------------------------------


def sh(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr}{proc.stdout}"
        )
    return proc


def qemu_img_create(path: Path, size: int, fmt: str = "qcow2", **opts: Any) -> Path:
    """``qemu-img create -f fmt -o k=v,... path size``; a ``backing`` option becomes -b/-F."""
    require_tool("qemu-img")
    args: list[str] = ["qemu-img", "create", "-q", "-f", fmt]
    backing = opts.pop("backing", None)
    if backing is not None:
        args += ["-b", str(backing), "-F", opts.pop("backing_fmt", "qcow2")]
    if opts:
        args += ["-o", ",".join(f"{k}={_opt(v)}" for k, v in opts.items())]
    sh(*args, path, str(size))
    return path


def _opt(v: Any) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> str:
    """Run ``qemu-io`` commands on an image; fail if any command failed."""
    require_tool("qemu-io")
    args: list[str] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    out = sh(*args, path).stdout
    assert "failed" not in out and "error" not in out.lower(), out
    return out


def qemu_map(path: Path, fmt: str) -> list[dict[str, Any]]:
    doc: list[dict[str, Any]] = json.loads(sh("qemu-img", "map", "-f", fmt, "--output=json", path).stdout)
    return doc


def qemu_check(path: Path, fmt: str = "qcow2") -> None:
    """``qemu-img check`` must find no error, leak or corruption."""
    proc = sh("qemu-img", "check", "-f", fmt, "--output=json", path, check=False)
    doc = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    assert proc.returncode == 0, f"qemu-img check {path}: {proc.stdout}{proc.stderr}"
    assert not doc.get("corruptions") and not doc.get("leaks"), doc


def qemu_read(path: Path, fmt: str, offset: int, length: int) -> bytes:
    """Guest bytes as QEMU reads them (the image converted to a sparse raw file)."""
    out = path.parent / f".read-{uuid.uuid4().hex}.raw"
    try:
        sh("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, out)
        with open(out, "rb") as f:
            f.seek(offset)
            return f.read(length)
    finally:
        out.unlink(missing_ok=True)


# -- the oracle -------------------------------------------------------------------------------


def our_map(path: Path, fmt: str = "auto") -> ExtentMap:
    with open_image(path, fmt, writing=False) as image:
        return image.map(ByteRange(0, image.virtual_size)).merged()


def assert_agrees_with_qemu(path: Path, fmt: str, *, strict_zero: bool = True) -> ExtentMap:
    """Every guest byte: QEMU's data at X is our data/shared at X (compressed where QEMU
    gives no offset); QEMU's no-data is our zero/unallocated. With ``strict_zero`` a
    present zero is ``zero`` and anything not present (or from a backing file) is
    ``unallocated``."""
    ours = our_map(path, "vhd" if fmt == "vpc" else fmt)
    theirs = qemu_map(path, fmt)
    q_start = np.array([e["start"] for e in theirs], dtype=np.int64)
    q_end = q_start + np.array([e["length"] for e in theirs], dtype=np.int64)
    assert int(q_end[-1]) == int(ours.starts[-1] + ours.lengths[-1]), "virtual sizes differ"
    o_end = ours.starts + ours.lengths
    bounds = np.unique(np.concatenate([q_start, q_end, ours.starts, o_end]))[:-1]
    qi = np.searchsorted(q_end, bounds, side="right")
    oi = np.searchsorted(o_end, bounds, side="right")
    for pos, a, b in zip(bounds.tolist(), qi.tolist(), oi.tolist(), strict=True):
        q = theirs[a]
        kind = ExtentKind(int(ours.kinds[b]))
        off = int(ours.offsets[b])
        where = f"{path} guest {pos:#x}: qemu {q}, ours {kind.label} at {off:#x}"
        if q["depth"] == 0 and q["data"]:
            if "offset" in q:
                assert kind in (ExtentKind.DATA, ExtentKind.SHARED), where
                assert off + (pos - int(ours.starts[b])) == q["offset"] + (pos - q["start"]), where
            else:
                assert kind is ExtentKind.COMPRESSED, where
        elif strict_zero:
            expect = ExtentKind.ZERO if q["depth"] == 0 and q["present"] else ExtentKind.UNALLOCATED
            assert kind is expect, where
        else:
            assert kind in (ExtentKind.ZERO, ExtentKind.UNALLOCATED), where
    return ours


# -- the CLI -----------------------------------------------------------------------------------


def cli(capsys: Any, *args: str) -> tuple[int, Any, str]:
    """Run the real CLI in-process: (exit code, parsed JSON or None, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    doc = json.loads(captured.out) if code == 0 and "--json" in args and captured.out.strip() else None
    return code, doc, captured.err


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def pattern(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, size=length, dtype=np.uint8).tobytes()


# -- a VHD writer, from the specification ----------------------------------------------------------


SECTOR = 512
TIMESTAMP_2000 = 946684800


def vhd_checksum(buf: bytes | bytearray, at: int) -> int:
    return ~(sum(buf) - sum(buf[at : at + 4])) & 0xFFFFFFFF


def chs(total_sectors: int) -> tuple[int, int, int]:
    """The geometry of the specification's appendix."""
    total = min(total_sectors, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def vhd_footer(
    size: int, disk_type: int, *, creator: bytes = b"vpc ", data_offset: int = 512,
    uid: bytes | None = None, saved_state: bool = False, geometry: tuple[int, int, int] | None = None,
) -> bytes:  # fmt: skip
    cyl, heads, spt = geometry or chs(size // SECTOR)
    buf = bytearray(
        struct.pack(
            ">8sIIQI4sI4sQQHBBII16sB427s", b"conectix", 2, 0x00010000,
            0xFFFFFFFFFFFFFFFF if disk_type == 2 else data_offset, 0, creator, 0x00050003, b"Wi2k",
            size, size, cyl, heads, spt, disk_type, 0, uid or uuid.uuid4().bytes, int(saved_state), b"",
        )
    )  # fmt: skip
    buf[64:68] = struct.pack(">I", vhd_checksum(buf, 64))
    return bytes(buf)


@dataclass
class VhdSpec:
    """A dynamic or differencing VHD to write: blocks are ``{index: (bitmap, data)}``."""

    size: int
    block_size: int = 2 * MiB
    blocks: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    creator: bytes = b"win "  # Hyper-V: the size is the footer's current size
    geometry: tuple[int, int, int] | None = None
    parent: Path | None = None
    parent_uid: bytes = b""
    locators: Sequence[tuple[int, bytes]] = ()  # (platform code, data)
    uid: bytes = field(default_factory=lambda: uuid.uuid4().bytes)
    saved_state: bool = False


def write_vhd(path: Path, spec: VhdSpec) -> Path:
    """Write ``spec`` as the specification lays a dynamic/differencing disk out: footer
    copy, dynamic header, BAT, parent locator data, then each block (bitmap + data)."""
    disk_type = 4 if spec.parent is not None else 3
    entries = -(-spec.size // spec.block_size)
    bat_bytes = -(-(entries * 4) // SECTOR) * SECTOR
    bitmap_bytes = max(SECTOR, -(-(spec.block_size // SECTOR // 8) // SECTOR) * SECTOR)
    bat_at = 1536
    pos = bat_at + bat_bytes
    locs = []
    for code, data in spec.locators:
        space = -(-len(data) // SECTOR) * SECTOR
        locs.append((code, space // SECTOR, len(data), pos, data))
        pos += space
    bat = np.full(entries, 0xFFFFFFFF, dtype=">u4")
    block_at = {}
    for index in sorted(spec.blocks):
        bat[index] = pos // SECTOR
        block_at[index] = pos
        pos += bitmap_bytes + spec.block_size
    footer = vhd_footer(spec.size, disk_type, creator=spec.creator, uid=spec.uid,
                        saved_state=spec.saved_state, geometry=spec.geometry)  # fmt: skip
    header = bytearray(1024)
    struct.pack_into(">8sQQIIII16sII", header, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, bat_at, 0x00010000,
                     entries, spec.block_size, 0, spec.parent_uid, 0, 0)  # fmt: skip
    if spec.parent is not None:
        name = spec.parent.name.encode("utf-16-be")[:512]
        header[64 : 64 + len(name)] = name
    for i, (code, sectors, length, at, _data) in enumerate(locs):
        struct.pack_into(">IIIIQ", header, 576 + 24 * i, code, sectors, length, 0, at)
    struct.pack_into(">I", header, 36, vhd_checksum(header, 36))
    with open(path, "wb") as f:
        f.write(footer)
        f.write(header)
        f.seek(bat_at)
        f.write(bat.tobytes())
        for _code, _s, _l, at, data in locs:
            f.seek(at)
            f.write(data)
        for index, (bitmap, data) in spec.blocks.items():
            f.seek(block_at[index])
            f.write(bitmap.ljust(bitmap_bytes, b"\0"))
            if data:
                f.write(data)
        f.seek(pos)
        f.write(footer)
    return path


def bitmap_of(sectors: Sequence[int], block_size: int = 2 * MiB) -> bytes:
    """A sector bitmap with the listed sectors set (MSB first)."""
    bits = np.zeros(block_size // SECTOR, dtype=np.uint8)
    bits[list(sectors)] = 1
    return np.packbits(bits).tobytes()


def spec_map(spec: VhdSpec) -> list[tuple[int, int, str]]:
    """The map the specification gives, one sector at a time (slow, obviously right):
    (guest sector, host offset or -1, kind)."""
    rows = []
    entries = -(-spec.size // spec.block_size)
    bat_bytes = -(-(entries * 4) // SECTOR) * SECTOR
    bitmap_bytes = max(SECTOR, -(-(spec.block_size // SECTOR // 8) // SECTOR) * SECTOR)
    pos = 1536 + bat_bytes + sum(-(-len(d) // SECTOR) * SECTOR for _c, d in spec.locators)
    at = {}
    for index in sorted(spec.blocks):
        at[index] = pos
        pos += bitmap_bytes + spec.block_size
    spb = spec.block_size // SECTOR
    for sector in range(spec.size // SECTOR):
        blk, s = divmod(sector, spb)
        if blk not in spec.blocks:
            rows.append((sector, -1, "unallocated"))
            continue
        bitmap = spec.blocks[blk][0]
        if bitmap[s // 8] >> (7 - s % 8) & 1:
            rows.append((sector, at[blk] + bitmap_bytes + s * SECTOR, "data"))
        else:
            rows.append((sector, -1, "unallocated"))
    return rows
