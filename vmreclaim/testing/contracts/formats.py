"""The format contract: map, read, punch and refusals, the same for every format driver,
with QEMU's own tools as the oracle (``qemu-img``, ``qemu-io``).

Subclass :class:`FormatContract` as ``Test<Something>``, set ``driver`` (entry-point
name) and ``qemu_format`` (QEMU's name for the format), and implement
:meth:`~FormatContract.make_image`: an image of ``SIZE`` bytes with non-zero data at
every range of ``WRITTEN`` and nothing else::

    class TestQcow2(FormatContract):
        driver = qemu_format = "qcow2"

        def make_image(self, tmp_path):
            img = tmp_path / "c.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)])
            run(["qemu-io", "-f", "qcow2", *qemu_io_writes(WRITTEN), str(img)])
            return img
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from vmreclaim.core import loader
from vmreclaim.core.extents import ExtentKind
from vmreclaim.core.formats import ImageFile, ImageFormat
from vmreclaim.core.opening import open_image
from vmreclaim.core.punch import allocated_bytes
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.testing.helpers import qemu_io_holding, require_tool

MIB = 1 << 20
#: Guest ranges an image of the suite holds data in: one inside the first MiB, one
#: straddling what is a cluster or block boundary in every format, one near the end.
WRITTEN = [(64 * 1024, 192 * 1024), (2 * MIB - 128 * 1024, 512 * 1024), (6 * MIB, MIB)]
#: Virtual size of an image of the suite.
SIZE = 8 * MIB


def qemu_io_writes(ranges: list[tuple[int, int]]) -> list[str]:
    """``qemu-io`` arguments writing a distinct non-zero pattern at each range."""
    return [arg for i, (s, n) in enumerate(ranges) for arg in ("-c", f"write -P {i + 1} {s} {n}")]


def qemu_read(path: Path, fmt: str, offset: int, length: int) -> bytes:
    """Guest bytes as QEMU reads them (the image converted to a sparse raw file)."""
    require_tool("qemu-img")
    out = path.parent / f".read-{uuid.uuid4().hex}.raw"
    try:
        subprocess.run(
            ["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        with open(out, "rb") as f:
            f.seek(offset)
            return f.read(length)
    finally:
        out.unlink(missing_ok=True)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """The real command line, in-process: (exit code, its JSON document or None, stderr)."""
    from vmreclaim.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    doc = json.loads(captured.out) if code == 0 and captured.out.strip() else None
    return code, doc, captured.err


class FormatContract:
    """Every format driver: probes its images, maps every byte in order, reads what QEMU
    reads, punches only what was asked and leaves the rest as it was, refuses ranges
    outside the disk (exit 2) and busy images (exit 3), and writes nothing on a dry run."""

    #: The driver's entry-point name in ``vmreclaim.formats``.
    driver: ClassVar[str]
    #: QEMU's name of the format (``-f`` of qemu-img), for the oracle.
    qemu_format: ClassVar[str]

    def make_image(self, tmp_path: Path) -> Path:
        """An image of ``SIZE`` bytes with data at ``WRITTEN`` (and nowhere else)."""
        raise NotImplementedError

    @pytest.fixture
    def image_path(self, tmp_path: Path) -> Path:
        return self.make_image(tmp_path)

    def test_is_installed_and_loads(self) -> None:
        found = {d.name: d for d in loader.installed("formats")}
        assert self.driver in found and found[self.driver].error is None

    def test_probe_recognises_its_own_images(self, image_path: Path) -> None:
        fmt = loader.load_driver("formats", self.driver, ImageFormat)
        with ImageFile(image_path) as f:
            assert fmt.probe(f) > 0

    def test_map_covers_the_disk_in_order_and_finds_the_data(self, image_path: Path) -> None:
        driver = self.driver
        with open_image(image_path, driver) as image:
            size = image.virtual_size
            assert size >= SIZE - MIB
            whole = image.map(ByteRange(0, size))
            whole.require_covers(ByteRange(0, size), driver)
            merged = whole.merged()
            assert set(np.unique(merged.kinds).tolist()) <= {int(k) for k in ExtentKind}
            data = merged.select(ExtentKind.DATA, ExtentKind.SHARED)
            for start, length in WRITTEN:
                assert data.guest_ranges().contains(RangeSet([start], [start + length])), (
                    f"{driver}: written range {start}+{length} not mapped as data"
                )
            # Any window maps as the same window of the whole map.
            for lo, n in [(0, 1), (SIZE // 2 + 12345, 777), (5, size - 10), (size - 512, 512)]:
                part = image.map(ByteRange(lo, n))
                part.require_covers(ByteRange(lo, n), driver)
                assert part.merged().to_json() == merged.clip(ByteRange(lo, n)).merged().to_json()
            # Data never sits on the format's own structures, nor past the end of the file.
            host = whole.select(ExtentKind.DATA).host_ranges()
            assert not host.intersect(image.metadata_ranges())
            assert int(host.ends[-1]) <= image.data_file.size
            # The JSON shape of DESIGN.md section 8.
            doc = json.loads(json.dumps(merged.to_json()))
            assert all(set(e) == {"start", "length", "kind", "offset"} for e in doc)

    def test_read_returns_what_qemu_reads(self, image_path: Path) -> None:
        with open_image(image_path, self.driver) as image:
            size = image.virtual_size
            assert image.read(0, size) == qemu_read(image_path, self.qemu_format, 0, size)

    def test_info_has_the_contract_keys(self, image_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        code, doc, _ = _cli(capsys, "image", "info", str(image_path), "--format", self.driver, "--json")
        assert code == 0
        assert {"format", "virtual_size", "cluster_size", "allocated_bytes", "backing"} <= set(doc)
        assert doc["allocated_bytes"] == allocated_bytes(image_path) and doc["backing"] == []

    def test_punch_frees_data_and_changes_nothing_else(
        self, image_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        fmt = self.qemu_format
        with open_image(image_path, self.driver) as image:
            size = image.virtual_size
        before = qemu_read(image_path, fmt, 0, size)
        start, length = WRITTEN[1]
        code, doc, err = _cli(capsys, "image", "reclaim", str(image_path), "--format", self.driver,
                              "--range", f"{start}:{length}", "--json")  # fmt: skip
        assert code == 0, err
        assert 0 < doc["punched_bytes"] <= length and doc["freed_bytes"] > 0
        assert doc["requested_bytes"] == length
        assert doc["punched_bytes"] + sum(s["length"] for s in doc["skipped"]) == length
        after = qemu_read(image_path, fmt, 0, size)
        changed = np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))
        assert changed.size and start <= int(changed[0]) and int(changed[-1]) < start + length
        assert not np.frombuffer(after, np.uint8)[changed].any()  # what changed is now zero
        assert changed.size >= doc["punched_bytes"] // 2  # the pattern bytes were non-zero

    @pytest.mark.parametrize("bad", [f"{SIZE * 4}:4096", "0:0", f"{SIZE - 4096}:{SIZE}"])
    def test_ranges_outside_the_disk_exit_2(
        self, image_path: Path, capsys: pytest.CaptureFixture[str], bad: str
    ) -> None:
        before = image_path.read_bytes()
        code, _, _ = _cli(
            capsys, "image", "reclaim", str(image_path), "--format", self.driver, "--range", bad, "--json"
        )
        assert code == 2
        assert image_path.read_bytes() == before

    def test_busy_image_exits_3(self, image_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        before = image_path.read_bytes()
        with qemu_io_holding(image_path, self.qemu_format):
            code, _, err = _cli(capsys, "image", "reclaim", str(image_path), "--format", self.driver,
                                "--range", f"{WRITTEN[0][0]}:{WRITTEN[0][1]}", "--json")  # fmt: skip
        assert code == 3, err
        assert image_path.read_bytes() == before

    def test_dry_run_writes_nothing(self, image_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        before = image_path.read_bytes()
        code, doc, _ = _cli(capsys, "image", "reclaim", str(image_path), "--format", self.driver,
                            "--range", f"0:{SIZE // 2}", "--dry-run", "--json")  # fmt: skip
        assert code == 0 and doc["dry_run"] is True and doc["freed_bytes"] == 0
        assert image_path.read_bytes() == before
