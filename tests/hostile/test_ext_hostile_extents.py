"""Hostile ext4 extent trees: the inode walk that backs the block bitmaps
(plugins/filesystems/ext_inodes.py) must refuse them (exit 4) without a crash, a hang or
a read off the disk, and leave the image untouched."""

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
BS = 4096


def _debugfs(img: Path, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, str(img)], capture_output=True, text=True, check=True, timeout=60
    )
    return proc.stdout


def _header(entries: int, depth: int, maximum: int = 4) -> bytes:
    return struct.pack("<HHHHI", 0xF30A, entries, maximum, depth, 0)


def _index(child: int) -> bytes:
    return struct.pack("<IIHH", 0, child & 0xFFFFFFFF, child >> 32, 0)


@pytest.mark.parametrize("shape", ["past_end", "loop", "too_deep", "bad_magic"])
def test_a_hostile_extent_tree_is_refused_and_nothing_changes(
    tmp_path: Path, shape: str, capsys: pytest.CaptureFixture[str]
) -> None:
    require_tool("mkfs.ext4", "debugfs")
    src = tmp_path / "src"
    src.mkdir()
    (src / "file.bin").write_bytes(os.urandom(64 * 1024))
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(32 * MIB)
    run(["mkfs.ext4", "-q", "-F", "-b", str(BS), "-O", "^metadata_csum", "-d", str(src), str(img)])
    found = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", _debugfs(img, "imap file.bin"))
    assert found
    inode_at = int(found.group(1)) * BS + int(found.group(2), 16)
    blocks = 32 * MIB // BS
    spare = int(_debugfs(img, "ffb 1 4000").split()[-1])  # a free block to hold a tree node
    if shape == "past_end":
        root, node = _header(1, 1) + _index(blocks + 5), b""
    elif shape == "loop":
        root, node = _header(1, 2) + _index(spare), _header(1, 1) + _index(spare)
    elif shape == "too_deep":
        root, node = _header(1, 9) + _index(spare), b""
    else:
        root, node = _header(1, 1) + _index(spare), struct.pack("<HHHHI", 0xBEEF, 1, 4, 0, 0)
    with open(img, "r+b") as f:
        f.seek(inode_at + 0x28)
        f.write(root.ljust(60, b"\0"))
        if node:
            f.seek(spare * BS)
            f.write(node.ljust(BS, b"\0"))
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    rc = main(["image", "sparsify", "--format", "raw", str(img)])
    assert rc == 4
    assert "inode 12" in capsys.readouterr().err
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


@pytest.mark.parametrize(
    "fstype, options",
    [
        ("ext4", ("-O", "inline_data,64bit", "-I", "256")),
        ("ext4", ("-O", "bigalloc", "-C", "16384")),
        ("ext3", ("-b", "1024")),
        ("ext2", ("-b", "4096")),
    ],
)
def test_the_inode_walk_accepts_healthy_shapes(tmp_path: Path, fstype: str, options: tuple[str, ...]) -> None:
    """Inline data, fast and slow symlinks, device nodes, xattr blocks, deep indirect maps,
    a journal and a resize inode name nothing the bitmap calls free: no refusal."""
    require_tool(f"mkfs.{fstype}", "debugfs")
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny").write_bytes(b"x" * 40)  # inline under inline_data
    (src / "big.bin").write_bytes(os.urandom(6 * MIB))  # double indirect with 1 KiB blocks
    (src / "sparse.bin").write_bytes(b"")
    with open(src / "sparse.bin", "r+b") as f:
        f.seek(5 * MIB)
        f.write(b"end")
    os.symlink("t", src / "fast")
    os.symlink("x" * 200, src / "slow")
    os.mkfifo(src / "fifo")
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(64 * MIB)
    run([f"mkfs.{fstype}", "-q", "-F", *options, "-d", str(src), str(img)])
    value = tmp_path / "value"
    value.write_bytes(b"v" * 3000)  # too big for the inode: goes to an xattr block
    run(["debugfs", "-w", "-R", f"ea_set -f {value} big.bin user.big", str(img)])
    run(["debugfs", "-w", "-R", "mknod dev c 1 3", str(img)])
    out = tmp_path / "out.bin"
    run(["debugfs", "-R", f"dump big.bin {out}", str(img)])
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    assert main(["image", "sparsify", "--format", "raw", str(img)]) == 0
    run(["debugfs", "-R", f"dump big.bin {out}", str(img)])
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("field, value", [("block[IND]", 1 << 30), ("block[DIND]", 0), ("file_acl", 1 << 29)])
def test_a_hostile_indirect_map_is_refused_and_nothing_changes(
    tmp_path: Path, field: str, value: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """ext2: an indirect pointer or xattr block past the end, or a double-indirect pointer at
    a free block (its zeroes name nothing, but the block itself is free), is refused."""
    require_tool("mkfs.ext2", "debugfs")
    src = tmp_path / "src"
    src.mkdir()
    (src / "file.bin").write_bytes(os.urandom(64 * 1024))
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(32 * MIB)
    run(["mkfs.ext2", "-q", "-F", "-b", str(BS), "-d", str(src), str(img)])
    value = value or int(_debugfs(img, "ffb 1 5000").split()[-1])  # 0: a free block
    run(["debugfs", "-w", "-R", f"sif file.bin {field} {value}", str(img)])
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    assert main(["image", "sparsify", "--format", "raw", str(img)]) == 4
    assert "inode 12" in capsys.readouterr().err
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
