"""Counts that do not overstate (issue 21 item 2): a dry run reports what a real run
frees (allocated ∩ asked), ``punched_bytes`` counts only bytes the image file held, and
bytes already punched are skipped as ``hole`` — on qcow2, where a punched cluster stays
mapped in the L2 table and so still looks like data to the format."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from vmreclaim.cli import main
from vmreclaim.core.punch import allocated_ranges, held_ranges
from vmreclaim.core.ranges import ByteRange
from vmreclaim.testing import require_tool

MIB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_ZERO_RANGE = 0x10

pytestmark = pytest.mark.qemu


def reclaim(capsys: pytest.CaptureFixture[str], image: Path, *extra: str) -> dict[str, object]:
    code = main(
        ["image", "reclaim", str(image), "--format", "qcow2", "--range", f"0:{8 * MIB}", "--json", *extra]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    """A qcow2 with 8 MiB of guest data in clusters of its own."""
    require_tool("qemu-img", "qemu-io")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(16 * MIB)], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {8 * MIB}", str(image)],
        check=True,
        capture_output=True,
    )
    return image


def test_dry_run_counts_only_what_a_real_run_frees(qcow2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Punch the first half, so the second request overlaps 4 MiB that are already holes.
    subprocess.run(
        ["vmreclaim", "image", "reclaim", str(qcow2), "--format", "qcow2", "--range", f"0:{4 * MIB}"],
        check=True,
        capture_output=True,
    )
    before = allocated(qcow2)
    dry = reclaim(capsys, qcow2, "--dry-run")
    assert allocated(qcow2) == before
    real = reclaim(capsys, qcow2)
    assert real["freed_bytes"] == 4 * MIB
    assert dry["punched_bytes"] == real["punched_bytes"] == real["freed_bytes"]
    skipped = {s["reason"]: s["length"] for s in dry["skipped"]}  # type: ignore[union-attr, index]
    assert skipped == {"hole": 4 * MIB}


def test_a_second_run_punches_and_counts_nothing(qcow2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = reclaim(capsys, qcow2)
    assert first["punched_bytes"] == first["freed_bytes"] == 8 * MIB
    again = reclaim(capsys, qcow2)
    assert again["punched_bytes"] == again["freed_bytes"] == 0
    assert reclaim(capsys, qcow2, "--dry-run")["punched_bytes"] == 0


def test_unwritten_extents_count_as_held_and_are_freed(
    qcow2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """QEMU allocates qcow2 clusters with fallocate(ZERO_RANGE): unwritten extents that
    SEEK_DATA calls holes but that hold blocks. They must be punched and counted."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    data = allocated_ranges_of(qcow2)
    last = list(data)[-1]
    zeroed = ByteRange(last.end - MIB, MIB)  # the last MiB of guest data, host side
    fd = os.open(qcow2, os.O_RDWR)
    try:
        if libc.fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, zeroed.start, zeroed.length):
            pytest.skip(f"host filesystem has no FALLOC_FL_ZERO_RANGE: {os.strerror(ctypes.get_errno())}")
        assert not allocated_ranges(fd, zeroed), "expected an unwritten extent that SEEK_DATA skips"
        assert held_ranges(fd, zeroed).total == MIB
    finally:
        os.close(fd)
    doc = reclaim(capsys, qcow2)
    assert doc["punched_bytes"] == doc["freed_bytes"] == 8 * MIB


def allocated_ranges_of(path: Path):  # type: ignore[no-untyped-def]
    fd = os.open(path, os.O_RDONLY)
    try:
        return allocated_ranges(fd)
    finally:
        os.close(fd)


def test_held_ranges_without_fiemap_counts_everything(tmp_path: Path) -> None:
    """A file where FIEMAP is refused (here: /dev/zero, a character device) counts every
    byte of the window as held: the safe direction (never drops what could be freed)."""
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        assert held_ranges(fd, ByteRange(0, MIB)).total == MIB
    finally:
        os.close(fd)
