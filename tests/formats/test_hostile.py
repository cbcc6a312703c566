"""Hostile images: every structure bounds-checked, every refusal exit 4 with a message
that names the structure and its offset, never a traceback, never a punch."""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from formats.imagetools import MiB, cli, qemu_img_create, qemu_io, sh
from vmreclaim.core.opening import open_image
from vmreclaim.testing import require_tool

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[2]


def load_fuzzer() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_images", ROOT / "bench" / "fuzz_images.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_images"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_few_hundred_fuzz_cases_crash_nothing() -> None:
    """The suite's share of ``bench/fuzz_images.py`` (which runs 10,000 and more)."""
    require_tool("qemu-img", "qemu-io")
    result = load_fuzzer().run(300, seed=20261125)
    assert result.cases == 300
    assert not result.crashes, "\n\n".join(f"{what}\n{tb}" for what, tb, _ in result.crashes[:5])
    # Both outcomes occur: the mutations reach past the first checks.
    assert result.passed > 30 and sum(result.refusals.values()) > 30


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    img = qemu_img_create(tmp_path / "h.qcow2", 4 * MiB, cluster_size=65536)
    qemu_io(img, "write -P 1 0 1M")
    return img


def put(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def header(img: Path) -> Any:
    with open_image(img) as image:
        return image.header  # type: ignore[attr-defined]


CASES: list[tuple[str, Any, str]] = [
    ("truncated header", lambda p: p.write_bytes(p.read_bytes()[:50]), "qcow2 header at 0x0 is truncated"),
    ("cluster bits", lambda p: put(p, 20, ">I", 30), "cluster_bits 30 outside 9..21"),
    ("version", lambda p: put(p, 4, ">I", 9), "qcow2 version 9 is not supported"),
    ("unknown feature", lambda p: put(p, 72, ">Q", 1 << 40), "unknown incompatible feature(s) bit 40"),
    ("L1 past the end", lambda p: put(p, 40, ">Q", 1 << 40), "active L1 table at 0x10000000000"),
    ("L1 too small", lambda p: put(p, 36, ">I", 0), "L1 table of 0 entries is too small"),
    ("absurd L1", lambda p: put(p, 36, ">I", 1 << 30), "L1 table of 1073741824 entries is too large"),
    ("reftable unaligned", lambda p: put(p, 48, ">Q", 0x10100), "table at 0x10100 is not cluster aligned"),
    ("absurd reftable", lambda p: put(p, 56, ">I", 1 << 20), "table of 1048576 clusters is too large"),
    ("snapshots past end", lambda p: (put(p, 60, ">I", 3), put(p, 64, ">Q", 1 << 30)), "table at 0x40000000"),
    ("LUKS without key area", lambda p: put(p, 32, ">I", 2), "no encryption header extension"),
    ("AES", lambda p: put(p, 32, ">I", 1), "legacy AES encryption is not supported"),
    ("backing name outside", lambda p: (put(p, 8, ">Q", 65530), put(p, 16, ">I", 100)),
     "backing file name at 0xfffa (+100) lies outside the header cluster"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "damage", "message"), CASES, ids=[c[0] for c in CASES])
def test_corrupt_headers_exit_4_with_a_message_naming_the_structure(
    qcow2: Path, capsys: Any, what: str, damage: Any, message: str
) -> None:
    damage(qcow2)
    for command in (["map"], ["info"], ["reclaim", "--range", "0:65536"]):
        before = qcow2.read_bytes()
        code, _, err = cli(
            capsys, "image", command[0], str(qcow2), "--format", "qcow2", *command[1:], "--json"
        )
        assert code == 4, f"{what}: {command}: exit {code}: {err}"
        assert message in err, err
        assert "Traceback" not in err
        assert qcow2.read_bytes() == before


def test_l2_table_pointing_at_the_l1_table_is_an_overlap(qcow2: Path, capsys: Any) -> None:
    """A "looping" table: the L1 entry names the L1 table itself as an L2 table."""
    h = header(qcow2)
    put(qcow2, h.l1_offset, ">Q", (1 << 63) | h.l1_offset)
    code, _, err = cli(capsys, "image", "reclaim", str(qcow2), "--range", "0:65536", "--json")
    assert code == 4 and "overlaps" in err and f"{h.l1_offset:#x}" in err, err


def test_refcount_block_on_the_header_is_an_overlap(qcow2: Path, capsys: Any) -> None:
    h = header(qcow2)
    put(qcow2, h.refcount_table_offset + 8, ">Q", 0)
    put(qcow2, h.refcount_table_offset, ">Q", 65536 * 0)  # block 0 now "absent": refcounts 0
    before = qcow2.read_bytes()
    assert _qemu_errors(qcow2) > 0
    code, _, err = cli(capsys, "image", "reclaim", str(qcow2), "--range", "0:65536", "--json")
    # Every cluster in use has refcount 0 now: `qemu-img check` errors, so refused.
    assert code == 4 and "refcount 0 but 1 reference" in err, err
    assert qcow2.read_bytes() == before


def test_two_guest_clusters_on_one_host_cluster_are_never_punched(qcow2: Path, capsys: Any) -> None:
    """A hostile L2 table names the same host cluster twice with COPIED set and the
    refcount left at 1: only the census of references catches it."""
    with open_image(qcow2) as image:
        l2 = int(image.l1_tables()[0][1][0]) & 0x00FFFFFFFFFFFE00  # type: ignore[attr-defined]
    with open(qcow2, "r+b") as f:
        f.seek(l2)
        first = f.read(8)
        f.seek(l2 + 8 * 20)
        f.write(first)  # guest cluster 20 now aliases guest cluster 0
    before = qcow2.read_bytes()
    assert _qemu_errors(qcow2) > 0
    code, _, err = cli(capsys, "image", "reclaim", str(qcow2), "--range", "0:65536", "--json")
    assert code == 4 and "has refcount 1 but 2 reference(s)" in err, err
    assert qcow2.read_bytes() == before


def _qemu_errors(path: Path) -> int:
    """Errors (corruptions and check errors) that ``qemu-img check`` counts."""
    import json

    proc = sh("qemu-img", "check", "-f", "qcow2", "--output=json", path, check=False)
    doc = json.loads(proc.stdout or "{}")
    return int(doc.get("corruptions", 0)) + int(doc.get("check-errors", 0))


def test_backing_chain_loop_is_refused(tmp_path: Path, capsys: Any) -> None:
    a = qemu_img_create(tmp_path / "a.qcow2", MiB)
    b = qemu_img_create(tmp_path / "b.qcow2", MiB, backing="a.qcow2")
    # Make a's backing file b (the name fits where qemu-img would put it).
    qemu_img_create(tmp_path / "a.qcow2", MiB, backing="b.qcow2")
    code, _, err = cli(capsys, "image", "map", str(b), "--json")
    assert code == 4 and "loops" in err, err
    assert a.exists()


def test_vhd_bat_past_the_end_is_refused(tmp_path: Path, capsys: Any) -> None:
    img = qemu_img_create(tmp_path / "v.vhd", 8 * MiB, "vpc")
    qemu_io(img, "write -P 1 0 1M", fmt="vpc")
    put(img, 1536, ">I", 0x7FFFFFF0)  # block 0 far past the end
    code, _, err = cli(capsys, "image", "map", str(img), "--json")
    assert code == 4 and "block allocation table at 0x600: block 0 at 0xffffffe000" in err, err


def data_file_image(tmp_path: Path, data: Path) -> Path:
    img = qemu_img_create(tmp_path / "df.qcow2", 4 * MiB, data_file=str(data))
    qemu_io(img, "write -P 1 0 1M")
    return img


def test_data_file_elsewhere_or_behind_a_link_is_never_punched(tmp_path: Path, capsys: Any) -> None:
    """The data file's name comes from the (untrusted) image: punch only a plain file
    next to the image that is not itself an image."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    img = data_file_image(tmp_path, other / "d.raw")
    code, _, err = cli(
        capsys, "image", "reclaim", str(img), "--range", "0:65536", "--format", "qcow2", "--json"
    )
    assert code == 4 and "not in the image's directory" in err, err
    assert (other / "d.raw").read_bytes()[:65536] == b"\x01" * 65536
    # A symbolic link next to the image, pointing elsewhere.
    (tmp_path / "link.raw").symlink_to(other / "d.raw")
    img2 = qemu_img_create(tmp_path / "df2.qcow2", 4 * MiB, data_file=str(tmp_path / "link.raw"))
    code, _, err = cli(
        capsys, "image", "reclaim", str(img2), "--range", "0:65536", "--format", "qcow2", "--json"
    )
    assert code == 4 and "not a regular file" in err, err
    # Map still works: offsets into the data file.
    code, doc, _ = cli(capsys, "image", "map", str(img), "--json")
    assert code == 0 and doc[0] == {"start": 0, "length": MiB, "kind": "data", "offset": 0}


def test_data_file_that_is_another_image_is_never_punched(tmp_path: Path, capsys: Any) -> None:
    img = data_file_image(tmp_path, tmp_path / "d.raw")
    # The name now leads to another VM's qcow2 image (here: its bytes under that name).
    victim = qemu_img_create(tmp_path / "d.raw", 4 * MiB)
    qemu_io(victim, "write -P 9 0 2M")
    before = victim.read_bytes()
    code, _, err = cli(
        capsys, "image", "reclaim", str(img), "--range", "0:1048576", "--format", "qcow2", "--json"
    )
    assert code == 4 and "is itself a qcow2 or VHD image" in err, err
    assert victim.read_bytes() == before


def test_fifo_backing_file_does_not_hang(tmp_path: Path, capsys: Any) -> None:
    os.mkfifo(tmp_path / "pipe")
    img = tmp_path / "t.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "pipe", "-F", "raw", img, "1M")
    code, _, err = cli(capsys, "image", "map", str(img), "--json")
    assert code == 4 and "not a regular file or block device" in err, err


def test_io_errors_are_mapped_to_image_errors(qcow2: Path) -> None:
    """OSError from the kernel is mapped at the boundary (STYLE.md point 14)."""
    import numpy as np

    from vmreclaim.core.errors import ImageError
    from vmreclaim.core.formats import ImageFile

    f = ImageFile(qcow2)
    fd = f.fd
    os.close(fd)  # the descriptor is gone: EBADF on every read
    with pytest.raises(ImageError, match="reading qcow2 header at 0x0 failed"):
        f.read(0, 512, "qcow2 header")
    with pytest.raises(ImageError, match="reading L2 table at 0x10000 failed"):
        f.read_many(np.array([65536], dtype=np.int64), 512, "L2 table")
    f.fd = -1
