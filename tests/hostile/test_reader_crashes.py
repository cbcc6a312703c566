"""Hostile filesystem metadata must be refused (exit 4), never crash the reader (exit 1).

Findings of the attack on issue 11's fixes that lie in readers other engineers still
edit: marked ``xfail(strict=True)`` with the precise problem, to pass once fixed.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from vmreclaim.cli import main
from vmreclaim.testing import require_tool

MIB = 1024 * 1024


@pytest.mark.xfail(
    strict=True,
    reason="plugins/filesystems/ntfs.py free_space: a non-resident attribute shorter than 34 "
    "bytes (one bit flipped in an MFT record's attribute length) reaches "
    "struct.unpack_from('<H', attr, 32) unchecked: struct.error, exit 1 instead of exit 4",
)
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
