"""Builders for real guest disks: ``mkfs.ext4 -d`` filesystems, partition tables written
by ``sfdisk``, deletions by ``debugfs -w``, format conversion by ``qemu-img``.

Every oracle here is an independent tool: ``dumpe2fs`` for free blocks, ``debugfs``
for file contents and block lists, ``qemu-img map`` for where guest bytes live in an
image file, ``e2fsck -fn`` and ``qemu-img check`` for consistency.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing import require_tool, run

MIB = 1 << 20
#: Where the first partition starts in the tables we write (sfdisk's default).
PART_START = MIB


@dataclass
class GuestDisk:
    """A disk image with one ext filesystem at ``fs_offset`` and the files put in it."""

    path: Path
    fs_offset: int
    block_size: int
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def fs_spec(self) -> str:
        """How e2fsprogs names the filesystem inside the image (``file?offset=N``)."""
        return f"{self.path}?offset={self.fs_offset}" if self.fs_offset else str(self.path)


def make_files(root: Path, count: int, *, seed: int = 7, max_size: int = 400 * 1024) -> dict[str, bytes]:
    """``count`` files of pseudo-random sizes and contents (incompressible, non-zero)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dir").mkdir(exist_ok=True)
    files = {}
    for i in range(count):
        size = int(rng.integers(1, max_size))
        name = f"f{i:04d}" if i % 3 else f"dir/f{i:04d}"
        data = rng.integers(1, 256, size=size, dtype=np.uint8).tobytes()
        (root / name).write_bytes(data)
        files["/" + name] = data
    return files


def mkfs(path: Path, size: int, src: Path, fstype: str = "ext4", *options: str) -> None:
    require_tool(f"mkfs.{fstype}")
    with open(path, "wb") as f:
        f.truncate(size)
    run([f"mkfs.{fstype}", "-q", "-F", "-E", "root_owner=0:0", *options, "-d", src, path])


def write_table(disk: Path, size: int, script: str) -> None:
    """Create a sparse ``disk`` of ``size`` bytes with the sfdisk ``script`` table."""
    require_tool("sfdisk")
    with open(disk, "wb") as f:
        f.truncate(size)
    proc = subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise AssertionError(f"sfdisk failed: {proc.stderr}")


def place(fs_image: Path, disk: Path, offset: int) -> None:
    """Copy a filesystem image into ``disk`` at ``offset``, keeping holes as holes."""
    run(
        [
            "dd",
            f"if={fs_image}",
            f"of={disk}",
            "bs=64K",
            f"seek={offset // 65536}",
            "conv=notrunc,sparse",
            "status=none",
        ]
    )
    fs_image.unlink()


def sfdisk_json(disk: Path) -> list[dict[str, object]]:
    doc = json.loads(run(["sfdisk", "-J", str(disk)]))
    parts: list[dict[str, object]] = doc["partitiontable"].get("partitions", [])
    return parts


def debugfs(spec: str, request: str, *, write: bool = False) -> str:
    args = ["debugfs", *(["-w"] if write else []), "-R", request, spec]
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode:
        raise AssertionError(f"debugfs {request!r} failed: {proc.stderr}")
    return proc.stdout


def file_block_ranges(disk: GuestDisk, name: str) -> RangeSet:
    """Disk byte ranges of a file's data blocks (``debugfs blocks``), partition applied."""
    blocks = [int(b) for b in debugfs(disk.fs_spec, f"blocks {name}").split()]
    b = np.array(blocks, dtype=np.int64) * disk.block_size + disk.fs_offset
    return RangeSet(b, b + disk.block_size)


def delete(disk: GuestDisk, names: list[str]) -> RangeSet:
    """``debugfs -w rm`` each file; return the disk byte ranges their blocks held."""
    held = RangeSet()
    for name in names:
        held = held | file_block_ranges(disk, name)
    # One debugfs session for all removals (one process, one journal-less write-out).
    script = "\n".join(f"rm {n}" for n in names) + "\n"
    proc = subprocess.run(
        ["debugfs", "-w", "-f", "-", disk.fs_spec],
        input=script,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if proc.returncode or "rm:" in proc.stderr:
        raise AssertionError(f"debugfs rm failed: {proc.stderr}")
    for n in names:
        disk.files.pop(n)
    return held


def dumpe2fs_free(spec: str, cluster: int) -> RangeSet:
    """Free bytes (filesystem-relative) as ``dumpe2fs`` lists them per group.

    Under bigalloc dumpe2fs names each free cluster by its first block, so a listed
    range ``a-b`` covers blocks ``a`` to ``b + cluster/block - 1``.
    """
    out = run(["dumpe2fs", spec])
    block = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    starts, ends = [], []
    for m in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in m.group(1).split(","))):
            a, _, b = part.partition("-")
            starts.append(int(a) * block)
            ends.append(int(b or a) * block + cluster)
    return RangeSet(starts, ends)


def assert_fsck_clean(disk: GuestDisk) -> None:
    proc = subprocess.run(["e2fsck", "-fn", disk.fs_spec], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"e2fsck -fn found problems:\n{proc.stdout}\n{proc.stderr}"


def assert_files_intact(disk: GuestDisk, scratch: Path) -> None:
    """Every remaining file reads back byte-identical (``debugfs dump``)."""
    scratch.mkdir(exist_ok=True)
    script = "".join(f"dump {n} {scratch / n.strip('/').replace('/', '_')}\n" for n in disk.files)
    subprocess.run(
        ["debugfs", "-f", "-", disk.fs_spec],
        input=script,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    for name, data in disk.files.items():
        got = (scratch / name.strip("/").replace("/", "_")).read_bytes()
        assert got == data, f"{name} changed: {len(got)} bytes read back, {len(data)} written"


def host_map(image: Path, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``qemu-img map``: guest starts, lengths and host offsets of the stored extents."""
    doc = json.loads(run(["qemu-img", "map", "-f", fmt, "--output=json", str(image)]))
    rows = [e for e in doc if e.get("data") and "offset" in e]
    return (
        np.array([e["start"] for e in rows], dtype=np.int64),
        np.array([e["length"] for e in rows], dtype=np.int64),
        np.array([e["offset"] for e in rows], dtype=np.int64),
    )


def to_host(guest: RangeSet, starts: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> RangeSet:
    """Host byte ranges of the stored parts of ``guest``, through a ``qemu-img map`` table."""
    ends = starts + lengths
    gs, ge = guest.starts, guest.ends
    # Every (extent, range) pair that overlaps; both lists are sorted and disjoint.
    lo = np.searchsorted(ge, starts, side="right")
    hi = np.searchsorted(gs, ends, side="left")
    counts = np.maximum(hi - lo, 0)
    ext = np.repeat(np.arange(starts.size), counts)
    rng = np.repeat(lo, counts) + (
        np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    )
    a = np.maximum(starts[ext], gs[rng])
    b = np.minimum(ends[ext], ge[rng])
    keep = b > a
    shift = offsets[ext] - starts[ext]
    return RangeSet((a + shift)[keep], (b + shift)[keep])


def punchable_bytes(image: Path, fmt: str, deleted: RangeSet, free_after: RangeSet) -> int:
    """Host bytes of the deleted files that a perfect sparsify can free.

    The granularity loss: only whole host-filesystem blocks can be deallocated, so the
    free guest ranges are mapped to host ranges (``qemu-img map``), rounded inward to
    host blocks, and intersected with where the deleted files' bytes are stored.
    """
    starts, lengths, offsets = host_map(image, fmt)
    block = os.statvfs(image).f_bsize
    free_host = to_host(free_after, starts, lengths, offsets).align_inward(block)
    deleted_host = to_host(deleted, starts, lengths, offsets)
    return free_host.intersect(deleted_host).total


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def convert(raw: Path, fmt: str) -> Path:
    """The raw image converted to ``fmt`` by ``qemu-img convert`` (raw: unchanged)."""
    if fmt == "raw":
        return raw
    require_tool("qemu-img")
    out = raw.with_suffix({"qcow2": ".qcow2", "vpc": ".vhd"}[fmt])
    opts = ["-o", "subformat=dynamic"] if fmt == "vpc" else []
    run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(raw), str(out)])
    raw.unlink()
    return out


def to_raw(image: Path, fmt: str, dest: Path) -> Path:
    """A raw copy of the guest disk, for the e2fsprogs oracles."""
    if fmt == "raw":
        return image
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(dest)])
    return dest
