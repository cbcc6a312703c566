"""Hostile filesystem metadata must be refused (exit 4), never crash the reader (exit 1).

Findings of the attack on issue 11's fixes that lie in readers other engineers still
edit (fixed since: every offset of an NTFS attribute is checked against its length).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from vmreclaim.cli import main
from vmreclaim.testing import require_tool

MIB = 1024 * 1024


def test_a_short_nonresident_ntfs_attribute_is_refused_not_a_crash(tmp_path: Path) -> None:
    require_tool("mkntfs")
    img = tmp_path / "ntfs.raw"
    with open(img, "wb") as f:
        f.truncate(32 * MIB)
    subprocess.run(["mkntfs", "-q", "-F", "-Q", "-c", "4096", str(img)], capture_output=True, check=True)
    # $MFT starts at cluster 4 (mkntfs's layout for this size); record 12 is a reserved,
    # in-use record; byte 264 is inside the length field of its first attribute.
    at = 4 * 4096 + 12 * 1024 + 264
    with open(img, "r+b") as f:
        f.seek(at)
        old = f.read(1)[0]
        f.seek(at)
        f.write(bytes([old ^ 1]))
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    rc = main(["image", "sparsify", "--format", "raw", str(img)])
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest
    assert rc == 4
