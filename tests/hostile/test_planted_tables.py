"""A partition table planted where a whole-disk filesystem does not look.

ext keeps its superblock at byte 1024 and never uses sector 0, so a guest (or a disk
partitioned once and reformatted whole) may carry an MBR there while the whole disk is
one ext4 filesystem. Reading that MBR's "partition" — here a FAT image that is the
content of a file of the real filesystem — as a volume of its own made ``image
sparsify`` punch 4 MiB of that file's data. A disk where a table and a whole-disk
filesystem both show is ambiguous: refuse, as ``blkid`` does, before punching anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from vmreclaim.cli import main
from vmreclaim.testing import require_tool, run

MIB = 1024 * 1024


def file_digest(img: Path, name: str, out: Path) -> str:
    run(["debugfs", "-R", f"dump {name} {out}", str(img)])
    return hashlib.sha256(out.read_bytes()).hexdigest()


def whole_disk_ext4_with_a_fat_file(tmp_path: Path) -> tuple[Path, int]:
    """A 32 MiB whole-disk ext4 (1 KiB blocks) holding ``fat.bin``, a 4 MiB FAT image
    whose free clusters are random bytes; returns the image and the file's disk offset."""
    src = tmp_path / "src"
    src.mkdir()
    payload = src / "fat.bin"
    payload.write_bytes(os.urandom(4 * MIB))  # random: no block is a hole in the ext4 file
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(32 * MIB)
    run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-d", str(src), str(img)])
    extents = run(["debugfs", "-R", "ex fat.bin", str(img)])
    rows = re.findall(r"(\d+) -\s+(\d+)\s+(\d+) -\s+(\d+)\s+(\d+)", extents)
    assert len(rows) == 1, extents  # one contiguous extent, logical 0 at physical p
    physical = int(rows[0][2]) * 1024
    # The guest writes a FAT filesystem as the file's content (mkfs on a copy, then the
    # bytes go where the file lives): its clusters are free in FAT, in use in ext4.
    fat = tmp_path / "fat.img"
    fat.write_bytes(os.urandom(4 * MIB))
    run(["mkfs.vfat", str(fat)])
    with open(img, "r+b") as f:
        f.seek(physical)
        f.write(fat.read_bytes())
    return img, physical


def plant_mbr(img: Path, start: int, length: int) -> None:
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<BBBBBBBBII", 0, 0, 0, 0, 0x0C, 0, 0, 0, start // 512, length // 512)
    mbr[510:512] = b"\x55\xaa"
    with open(img, "r+b") as f:
        f.write(mbr)  # sector 0: ext's unused boot block


@pytest.mark.parametrize("fmt", [None, "raw"], ids=["probed", "raw"])
def test_an_mbr_planted_over_a_whole_disk_ext4_punches_nothing(tmp_path: Path, fmt: str | None) -> None:
    require_tool("mkfs.ext4", "mkfs.vfat", "debugfs", "e2fsck")
    img, physical = whole_disk_ext4_with_a_fat_file(tmp_path)
    plant_mbr(img, physical, 4 * MIB)
    assert subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True).returncode == 0
    before = file_digest(img, "fat.bin", tmp_path / "before.bin")
    image_before = hashlib.sha256(img.read_bytes()).hexdigest()
    rc = main(["image", "sparsify", *(["--format", fmt] if fmt else []), str(img)])
    assert file_digest(img, "fat.bin", tmp_path / "after.bin") == before
    assert rc == 4
    assert hashlib.sha256(img.read_bytes()).hexdigest() == image_before


def test_a_fat_boot_sector_over_an_mbr_does_not_hide_its_partitions(tmp_path: Path) -> None:
    """A FAT BPB in sector 0 whose partition entries are valid: Linux reads the entries
    (boot flags 0x00/0x80) and mounts partition 1's ext4, while vmreclaim took the whole
    disk for an empty FAT16 and punched all 30 MiB of that ext4. Refuse: ambiguous."""
    require_tool("mkfs.ext4", "mkfs.vfat", "e2fsck")
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(40 * MIB)
    run(["mkfs.vfat", "-F", "16", str(img)])
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(8 * MIB))
    part = tmp_path / "part.raw"
    with open(part, "wb") as f:
        f.truncate(30 * MIB)
    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(part)])
    with open(img, "r+b") as f:
        f.seek(446)
        f.write(struct.pack("<BBBBBBBBII", 0, 0, 0, 0, 0x83, 0, 0, 0, MIB // 512, 30 * MIB // 512))
        f.seek(MIB)
        f.write(part.read_bytes())
    image_before = hashlib.sha256(img.read_bytes()).hexdigest()
    rc = main(["image", "sparsify", "--format", "raw", str(img)])
    assert hashlib.sha256(img.read_bytes()).hexdigest() == image_before
    assert rc == 4
