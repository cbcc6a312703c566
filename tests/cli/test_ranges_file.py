"""``image reclaim --ranges-file`` as README and ``--help`` describe it, and dry-run fields."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

MiB = 1 << 20


def reclaim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmreclaim.cli", "image", "reclaim", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\xa5" * (4 * MiB))
    return path


@pytest.mark.parametrize(
    "text",
    [
        "# deleted files\n0x100000:1048576\n\n2097152 1048576  # second\n",
        "[[1048576, 1048576], [2097152, 1048576]]",
    ],
)
def test_both_forms_of_a_ranges_file_dry_run(tmp_path: Path, image: Path, text: str) -> None:
    ranges = tmp_path / "ranges"
    ranges.write_text(text)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    r = reclaim(str(image), "--format", "raw", "--ranges-file", str(ranges), "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["requested_bytes"] == 2 * MiB
    assert doc["dry_run"] is True
    assert doc["would_punch_bytes"] == doc["punched_bytes"] == 2 * MiB
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before  # nothing changed


def test_a_bad_line_names_file_and_line(tmp_path: Path, image: Path) -> None:
    ranges = tmp_path / "ranges"
    ranges.write_text("0:4096\n1:2:3\n")
    r = reclaim(str(image), "--format", "raw", "--ranges-file", str(ranges))
    assert r.returncode == 2
    assert f"{ranges}:2:" in r.stderr


def test_a_real_run_has_no_would_field(tmp_path: Path, image: Path) -> None:
    r = reclaim(str(image), "--format", "raw", "--range", "0:1048576", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert "would_punch_bytes" not in doc and doc["punched_bytes"] == MiB
