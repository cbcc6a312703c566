"""Offline reclaim of raw images, end to end through the CLI, on real files."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmreclaim.cli import main
from vmreclaim.core.errors import RangeError
from vmreclaim.core.locks import hold_for_writing
from vmreclaim.core.opening import open_image
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing import make_disk, make_raw_image, qemu_io_holding

MIB = 1 << 20


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, object]:
    code = main([*args])
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 and "--json" in args else out)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_punch_frees_blocks_and_keeps_other_bytes(
    raw_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img = raw_image(16 * MIB, [(0, 16 * MIB)])
    before = img.read_bytes()
    # Measured, not assumed to be the file's length: a file written on a busy host
    # filesystem may be fragmented enough to hold an extent-tree block too.
    held_before = allocated(img)
    code, doc = cli(
        capsys,
        "image",
        "reclaim",
        str(img),
        "--range",
        f"{MIB}:{2 * MIB}",
        "--range",
        f"{8 * MIB + 100}:{MIB}",
        "--json",
    )
    assert code == 0
    assert isinstance(doc, dict)
    after = img.read_bytes()
    block = os.statvfs(img).f_bsize
    # The second range is not block aligned: its head and tail partial blocks stay.
    head = 8 * MIB + block
    tail = 9 * MIB + 100 - (9 * MIB + 100) % block
    assert doc["requested_bytes"] == 3 * MIB
    assert doc["punched_bytes"] == 2 * MIB + (tail - head)
    assert doc["freed_bytes"] == doc["punched_bytes"]
    assert doc["freed_bytes"] == held_before - allocated(img)
    assert sum(s["length"] for s in doc["skipped"]) == doc["requested_bytes"] - doc["punched_bytes"]
    assert {s["reason"] for s in doc["skipped"]} == {"partial-block"}
    assert after[MIB : 3 * MIB] == bytes(2 * MIB)
    assert after[head:tail] == bytes(tail - head)
    outside = [(0, MIB), (3 * MIB, head), (tail, len(before))]
    for lo, hi in outside:
        assert after[lo:hi] == before[lo:hi], f"bytes [{lo}, {hi}) changed"


def test_map_reports_holes_as_zero_and_data_with_identity_offsets(
    raw_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img = raw_image(8 * MIB, [(MIB, MIB), (4 * MIB, 512 * 1024)])
    code, doc = cli(capsys, "image", "map", str(img), "--json")
    assert code == 0
    assert doc == [
        {"start": 0, "length": MIB, "kind": "zero", "offset": None},
        {"start": MIB, "length": MIB, "kind": "data", "offset": MIB},
        {"start": 2 * MIB, "length": 2 * MIB, "kind": "zero", "offset": None},
        {"start": 4 * MIB, "length": 512 * 1024, "kind": "data", "offset": 4 * MIB},
        {"start": 4 * MIB + 512 * 1024, "length": 3 * MIB + 512 * 1024, "kind": "zero", "offset": None},
    ]
    code, doc = cli(capsys, "image", "map", str(img), "--json", "--start", str(MIB + 10), "--length", "100")
    assert doc == [{"start": MIB + 10, "length": 100, "kind": "data", "offset": MIB + 10}]


def test_info(raw_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    img = raw_image(8 * MIB, [(0, MIB)])
    code, doc = cli(capsys, "image", "info", str(img), "--json")
    assert code == 0
    assert doc == {
        "format": "raw",
        "virtual_size": 8 * MIB,
        "cluster_size": os.statvfs(img).f_bsize,
        "allocated_bytes": allocated(img),
        "backing": [],
    }


@pytest.mark.parametrize(
    "args",
    [
        ["--range", f"{8 * MIB - 4096}:8192"],  # runs past the end of the disk
        ["--range", f"{8 * MIB}:1"],  # starts at the end
        ["--range=-4096:8192"],  # negative start
        ["--range", "0:-1"],  # negative length
        ["--range", "0:0"],  # empty
        ["--range", f"{2**63 - 10}:100"],  # overflows int64
        ["--range", "0x10:abc"],  # not a number
        ["--range", "4096"],  # no length
    ],
)
def test_bad_ranges_exit_2_and_write_nothing(
    raw_image: Callable[..., Path], capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    img = raw_image(8 * MIB, [(0, 8 * MIB)])
    before, blocks = img.read_bytes(), allocated(img)
    mtime = os.stat(img).st_mtime_ns
    assert main(["image", "reclaim", str(img), *args, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error" in captured.err
    assert img.read_bytes() == before and allocated(img) == blocks
    assert os.stat(img).st_mtime_ns == mtime


def test_empty_ranges_file_exits_2(raw_image: Callable[..., Path], tmp_path: Path) -> None:
    img = raw_image(8 * MIB, [(0, 8 * MIB)])
    empty = tmp_path / "ranges.txt"
    empty.write_text("# nothing\n")
    assert main(["image", "reclaim", str(img), "--ranges-file", str(empty)]) == 2
    (tmp_path / "r.json").write_text("[]")
    assert main(["image", "reclaim", str(img), "--ranges-file", str(tmp_path / "r.json")]) == 2
    (tmp_path / "bad.json").write_text('[[0, "x"]]')
    assert main(["image", "reclaim", str(img), "--ranges-file", str(tmp_path / "bad.json")]) == 2
    assert allocated(img) == 8 * MIB


def test_ranges_file_forms(
    raw_image: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = raw_image(8 * MIB, [(0, 8 * MIB)])
    (tmp_path / "r.txt").write_text(f"0:{MIB}  # first\n{2 * MIB} {MIB}\n")
    code, doc = cli(capsys, "image", "reclaim", str(img), "--ranges-file", str(tmp_path / "r.txt"), "--json")
    assert code == 0 and isinstance(doc, dict) and doc["punched_bytes"] == 2 * MIB
    (tmp_path / "r.json").write_text(json.dumps([[4 * MIB, MIB]]))
    code, doc = cli(capsys, "image", "reclaim", str(img), "--ranges-file", str(tmp_path / "r.json"), "--json")
    assert code == 0 and isinstance(doc, dict) and doc["freed_bytes"] == MIB


def test_dry_run_changes_nothing(raw_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    img = raw_image(8 * MIB, [(0, 8 * MIB)])
    before = img.read_bytes()
    code, doc = cli(capsys, "image", "reclaim", str(img), "--range", f"0:{4 * MIB}", "--dry-run", "--json")
    assert code == 0 and isinstance(doc, dict)
    assert doc["dry_run"] is True and doc["punched_bytes"] == 4 * MIB and doc["freed_bytes"] == 0
    assert img.read_bytes() == before


def test_reclaiming_holes_is_idempotent(
    raw_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img = raw_image(8 * MIB, [(0, 4 * MIB)])
    args = ["image", "reclaim", str(img), "--range", f"0:{8 * MIB}", "--json"]
    code, first = cli(capsys, *args)
    code2, second = cli(capsys, *args)
    assert code == code2 == 0
    assert isinstance(first, dict) and isinstance(second, dict)
    assert first["freed_bytes"] == 4 * MIB and first["punched_bytes"] == 4 * MIB
    assert second["freed_bytes"] == 0 and second["punched_bytes"] == 0
    assert {s["reason"] for s in second["skipped"]} == {"zero"}


@pytest.mark.qemu
def test_busy_image_exits_3_without_writing(
    raw_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img = raw_image(8 * MIB, [(0, 8 * MIB)])
    before = img.read_bytes()
    with qemu_io_holding(img, "raw"):
        assert main(["image", "reclaim", str(img), "--range", f"0:{MIB}"]) == 3
        assert "busy" in capsys.readouterr().err
        assert main(["image", "reclaim", str(img), "--range", f"0:{MIB}", "--dry-run"]) == 3
    assert img.read_bytes() == before
    # Once qemu-io is gone the same command succeeds.
    assert main(["image", "reclaim", str(img), "--range", f"0:{MIB}"]) == 0


@pytest.mark.qemu
def test_our_lock_keeps_qemu_out_while_we_write(raw_image: Callable[..., Path]) -> None:
    img = raw_image(MIB, [(0, MIB)])
    with hold_for_writing(img):
        proc = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4096", str(img)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode != 0 and "lock" in proc.stderr.lower()


def test_missing_and_unreadable_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "info", str(tmp_path / "nope.raw")]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["image", "map", str(tmp_path)]) == 2
    assert main(["image", "info", str(tmp_path / "x"), "--format", "nosuchformat"]) == 2


def test_unknown_format_name_lists_installed(
    raw_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img = raw_image(MIB)
    assert main(["image", "info", str(img), "--format", "qcow3"]) == 2
    err = capsys.readouterr().err
    assert "no formats driver named 'qcow3'" in err and "raw" in err


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 16)), min_size=1, max_size=6),
    asked=st.lists(
        st.tuples(st.integers(0, 256 * 4096 - 1), st.integers(1, 64 * 4096)), min_size=1, max_size=6
    ),
)
def test_punch_property(
    tmp_path_factory: pytest.TempPathFactory, data: list[tuple[int, int]], asked: list[tuple[int, int]]
) -> None:
    """Whatever is asked: asked bytes read zero or are skipped with a reason, the rest is
    untouched, and every requested byte is accounted for."""
    size = 256 * 4096
    img = make_raw_image(
        tmp_path_factory.mktemp("p") / "d.raw",
        size,
        [(b * 4096, min(n * 4096, size - b * 4096)) for b, n in data],
    )
    before = img.read_bytes()
    ranges = RangeSet.from_ranges([(s, min(n, size - s)) for s, n in asked])
    with open_image(img) as image:
        report = Pipeline().reclaim(make_disk(img), image, ranges)
    after = img.read_bytes()
    assert report.requested_bytes == ranges.total
    assert report.punched_bytes + sum(s.length for s in report.skipped) == report.requested_bytes
    asked_bytes = ranges
    for r in RangeSet([0], [size]).subtract(asked_bytes):
        assert after[r.start : r.end] == before[r.start : r.end]
    for r in asked_bytes:
        chunk = after[r.start : r.end]
        if chunk != bytes(len(chunk)):
            # Only partial blocks may keep data.
            skipped = RangeSet.from_ranges(
                [(s.start, s.length) for s in report.skipped if s.reason == "partial-block"]
            )
            nonzero = [i for i, b in enumerate(chunk) if b]
            assert all(skipped.contains(RangeSet([r.start + i], [r.start + i + 1])) for i in nonzero[:50])


def test_range_error_for_request_outside_disk_api(raw_image: Callable[..., Path]) -> None:
    img = raw_image(MIB, [(0, MIB)])
    with open_image(img) as image, pytest.raises(RangeError, match="outside the virtual disk"):
        Pipeline().reclaim(make_disk(img), image, RangeSet.from_ranges([(MIB - 10, 20)]))


@pytest.mark.root
def test_host_filesystem_that_cannot_punch_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ramfs has no FALLOC_FL_PUNCH_HOLE: exit 4, a message naming it, the file intact."""
    from vmreclaim.testing.helpers import require_root, run

    require_root()
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    run(["mount", "-t", "ramfs", "ramfs", str(mnt)])
    try:
        img = make_raw_image(mnt / "d.raw", 4 * MIB, [(0, 4 * MIB)])
        before = img.read_bytes()
        assert main(["image", "reclaim", str(img), "--range", f"0:{MIB}"]) == 4
        err = capsys.readouterr().err
        assert "cannot punch holes" in err and str(img) in err
        assert img.read_bytes() == before
    finally:
        run(["umount", str(mnt)])
