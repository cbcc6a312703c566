"""A corrupt qcow2 is refused before anything is punched (issue 11 item 6).

``qemu-img check`` is the oracle: whenever it counts an error (a corruption or a check
error, or cannot open the image at all), ``image reclaim`` exits 4 and the file is
byte for byte unchanged. The named cases follow QEMU's own corruption tests (iotests
060, 138 and friends: an L2 entry past the end of the file, a refcount below its
references, two entries on one cluster, a misaligned offset, a wrong COPIED flag); the
hypothesis test damages every kind of table at random.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.imagetools import MiB, cli, qemu_img_create, qemu_io, sh
from vmreclaim.cli import main
from vmreclaim.core.opening import open_image

pytestmark = pytest.mark.qemu

SIZE = 4 * MiB
CS = 65536
COPIED = 1 << 63
EXAMPLES = int(os.environ.get("VMRECLAIM_ORACLE_EXAMPLES", min(settings.default.max_examples, 80)))


def qemu_errors(path: Path) -> int:
    """What ``qemu-img check`` counts as errors; an image it cannot open counts as one."""
    proc = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", "--output=json", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if not proc.stdout.strip().startswith("{"):
        return 1  # "Could not open": QEMU refuses the image outright
    doc = json.loads(proc.stdout)
    return int(doc.get("corruptions", 0)) + int(doc.get("check-errors", 0))


@dataclass(frozen=True)
class Layout:
    """Where the template's tables are (read once with our own parser)."""

    image: bytes = field(repr=False)
    l1: int
    l1_entries: int
    l2: list[int]
    reftable: int
    refblocks: list[int]
    snapshot_l1: int


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """A qcow2 with data, an internal snapshot and data written after it (so some
    clusters are shared and some COPIED): every kind of table exists."""
    tmp = tmp_path_factory.mktemp("qcow2check")
    img = qemu_img_create(tmp / "t.qcow2", SIZE, cluster_size=CS)
    qemu_io(img, "write -P 1 0 1M", "write -P 2 2M 512K")
    sh("qemu-img", "snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 3 256K 256K", "write -P 4 3M 64K")
    assert qemu_errors(img) == 0
    with open_image(img, "qcow2") as image:
        h = image.header  # type: ignore[attr-defined]
        l1 = image.l1_tables()[0][1]  # type: ignore[attr-defined]
        l2 = sorted({int(e) & 0x00FFFFFFFFFFFE00 for e in l1 if int(e)})
        reft = image._refcounts.table  # type: ignore[attr-defined]
        blocks = [int(e) & ~0x1FF for e in reft if int(e)]
        snap = image._snapshots[0].l1_offset  # type: ignore[attr-defined]
    return Layout(img.read_bytes(), h.l1_offset, h.l1_size, l2, h.refcount_table_offset, blocks, snap)


def _put(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _read(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    return value


def _assert_refused(path: Path, capsys: Any, message: str = "") -> None:
    before = path.read_bytes()
    assert qemu_errors(path) > 0, "the oracle sees no error: not a corruption case"
    code, _, err = cli(
        capsys, "image", "reclaim", str(path), "--format", "qcow2", "--range", f"0:{SIZE}", "--json"
    )
    assert code == 4, err
    assert message in err, err
    assert path.read_bytes() == before


@pytest.fixture
def image(tmp_path: Path, template: Layout) -> Path:
    path = tmp_path / "c.qcow2"
    path.write_bytes(template.image)
    return path


def test_l2_entry_past_the_end_of_the_file(image: Path, template: Layout, capsys: Any) -> None:
    """QEMU iotest 060's case: an L2 entry names a cluster far past the end."""
    entry = _read(image, template.l2[0] + 8 * 20, ">Q")
    assert entry == 0  # guest cluster 20 (1.25 MiB) is unallocated in the template
    _put(image, template.l2[0] + 8 * 20, ">Q", COPIED | (1 << 40))
    _assert_refused(image, capsys, "past end of file")


def test_refcount_below_the_references(image: Path, template: Layout, capsys: Any) -> None:
    """A data cluster's refcount drops to 0: "in use" and "free" at once."""
    first = _read(image, template.l2[0], ">Q") & 0x00FFFFFFFFFFFE00
    _put(image, template.refblocks[0] + 2 * (first // CS), ">H", 0)
    _assert_refused(image, capsys, "has refcount 0 but")


def test_two_entries_on_one_cluster(image: Path, template: Layout, capsys: Any) -> None:
    """Guest cluster 20 aliases cluster 4 (COPIED set, refcount left at 1)."""
    _put(image, template.l2[0] + 8 * 20, ">Q", _read(image, template.l2[0] + 8 * 4, ">Q"))
    _assert_refused(image, capsys, "reference(s)")


def test_misaligned_data_offset(image: Path, template: Layout, capsys: Any) -> None:
    _put(image, template.l2[0] + 8 * 4, ">Q", _read(image, template.l2[0] + 8 * 4, ">Q") + 512)
    _assert_refused(image, capsys, "unaligned")


def test_copied_flag_on_a_shared_cluster(image: Path, template: Layout, capsys: Any) -> None:
    """Guest cluster 0 is shared with the snapshot (refcount 2): COPIED must be clear,
    else QEMU would write into the snapshot's data in place."""
    entry = _read(image, template.l2[0], ">Q")
    assert not entry & COPIED
    _put(image, template.l2[0], ">Q", entry | COPIED)
    _assert_refused(image, capsys, "COPIED")


def test_l1_entry_past_the_end_of_the_file(image: Path, template: Layout, capsys: Any) -> None:
    _put(image, template.l1, ">Q", COPIED | (1 << 40))
    _assert_refused(image, capsys, "past end of file")


# -- the oracle, at random --------------------------------------------------------------------------


def _value(draw: Any, old: int, width: int, file_size: int) -> int:
    kind = draw(st.sampled_from(["random", "cluster", "flip", "delta", "zero"]))
    top = (1 << (8 * width)) - 1
    if kind == "random":
        return int(draw(st.integers(0, top)))
    if kind == "cluster":  # a plausible entry naming some cluster, in or past the file
        cluster = draw(st.integers(0, file_size // CS + 4))
        return (old & ~0x00FFFFFFFFFFFE00 & top) | ((cluster * CS) & top)
    if kind == "flip":
        return old ^ (1 << draw(st.integers(0, 8 * width - 1)))
    if kind == "delta":
        return (old + draw(st.integers(-3, 3)) * draw(st.sampled_from([1, 512, CS]))) & top
    return 0


@st.composite
def damage(draw: Any, template: Layout) -> list[tuple[int, str, int]]:
    """One to three writes into the tables: (offset, struct format, value)."""
    size = len(template.image)
    out = []
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["l1", "l2", "snapshot_l1", "reftable", "refblock", "header"]))
        if where == "refblock":
            at, fmt = (
                draw(st.sampled_from(template.refblocks)) + 2 * draw(st.integers(0, size // CS + 2)),
                ">H",
            )
        elif where == "header":
            at, fmt = draw(st.sampled_from([40, 48, 56, 64, 72, 80])), ">Q"  # tables and features
        else:
            base = {
                "l1": template.l1, "snapshot_l1": template.snapshot_l1, "reftable": template.reftable,
                "l2": draw(st.sampled_from(template.l2)) if where == "l2" else 0,
            }[where]  # fmt: skip
            entries = template.l1_entries if "l1" in where else CS // 8
            at, fmt = base + 8 * draw(st.integers(0, min(entries, 80) - 1)), ">Q"
        old = struct.unpack_from(fmt, template.image, at)[0]
        out.append((at, fmt, _value(draw, old, struct.calcsize(fmt), size)))
    return out


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_whenever_qemu_img_check_finds_errors_reclaim_refuses(
    data: st.DataObject, template: Layout, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.qcow2"
    path.write_bytes(template.image)
    for at, fmt, value in data.draw(damage(template)):
        _put(path, at, fmt, value)
    errors = qemu_errors(path)
    before = path.read_bytes()
    code = main(["image", "reclaim", str(path), "--format", "qcow2", "--range", f"0:{SIZE}", "--json"])
    assert code in (0, 4), f"exit {code}: a crash is never an answer"
    if errors:
        assert code == 4, f"qemu-img check counts {errors} error(s), but reclaim went ahead"
        assert path.read_bytes() == before
    shutil.rmtree(path.parent)
