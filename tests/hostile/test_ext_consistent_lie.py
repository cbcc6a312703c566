"""An ext2 block bitmap that lies consistently: one block of a file marked free and one
free block marked used in the same group, so the group's count, the superblock total
and (ext2 has none) checksums all agree. Only the inode that still names the block can
tell: the reader's inode walk (plugins/filesystems/ext_inodes.py) must refuse, so the
property "sparsify refuses or every file's content is unchanged" holds.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from vmreclaim.cli import main
from vmreclaim.testing import require_tool, run

MIB = 1024 * 1024


def debugfs(img: Path, *requests: str, write: bool = False) -> str:
    proc = subprocess.run(
        ["debugfs", *(["-w"] if write else []), "-f", "-", str(img)],
        input="\n".join(requests) + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return proc.stdout


def test_a_consistently_lying_ext2_bitmap_does_not_cost_a_file_its_block(tmp_path: Path) -> None:
    require_tool("mkfs.ext2", "debugfs")
    src = tmp_path / "src"
    src.mkdir()
    (src / "file.bin").write_bytes(os.urandom(64 * 1024))
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(32 * MIB)
    run(["mkfs.ext2", "-q", "-F", "-b", "4096", "-d", str(src), str(img)])
    used = int(debugfs(img, "bmap file.bin 0").split()[-1])
    free = int(debugfs(img, f"ffb 1 {used}").split()[-1])
    assert used // 32768 == free // 32768  # one group: its count stays right
    debugfs(img, f"freeb {used}", f"setb {free}", write=True)
    out = tmp_path / "out.bin"
    run(["debugfs", "-R", f"dump file.bin {out}", str(img)])
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    rc = main(["image", "sparsify", "--format", "raw", str(img)])
    run(["debugfs", "-R", f"dump file.bin {out}", str(img)])
    assert rc == 4  # the inode walk refuses: it names the block the bitmap calls free
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
