"""LVM2 logical volumes read from a PV's metadata, against lvm2's own ``lvs``/``pvs``.

This host has no device-mapper, but lvm2 writes its metadata without one: ``pvcreate``,
``vgcreate`` and ``lvcreate --driverloaded n -an -Zn`` on a loop device, with a private
``LVM_SYSTEM_DIR`` (no devices file, no udev, no backups). The oracle for where each LV
lives is ``lvs -o seg_pe_ranges`` with ``pvs -o pe_start`` and the VG's extent size;
filesystems are then written into an LV's byte range directly, as the guest would see
them through device-mapper.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmreclaim.cli import main
from vmreclaim.core.errors import VMReclaimError
from vmreclaim.core.filesystems import identify
from vmreclaim.core.lvm import lvm_crc, parse
from vmreclaim.core.opening import open_image
from vmreclaim.core.volumes import Volume, scan_volumes
from vmreclaim.testing import require_root, require_tool, run

from .disks import MIB, GuestDisk, allocated, assert_files_intact, delete, dumpe2fs_free, make_files, mkfs

LVM_CONF = """
devices { use_devicesfile = 0 obtain_device_list_from_udev = 0 scan = ["/dev"] }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
"""


class Lvm:
    """lvm2 commands confined to one test's configuration and loop devices."""

    def __init__(self, conf: Path) -> None:
        self.env = {**os.environ, "LVM_SYSTEM_DIR": str(conf)}

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(
            [*args[:1], "--driverloaded", "n", *args[1:]] if args[0].startswith("lv") else list(args),
            capture_output=True,
            text=True,
            check=False,
            env=self.env,
            timeout=120,
        )
        if proc.returncode:
            raise AssertionError(f"{' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def report(self, what: str, *fields: str) -> list[dict[str, str]]:
        out = self(what, "--reportformat", "json", "--units", "b", "--nosuffix", "-a", "-o", ",".join(fields))
        rows: list[dict[str, str]] = json.loads(out)["report"][0][what.rstrip("s") if what != "lvs" else "lv"]
        return rows


@contextmanager
def loops(*images: Path) -> Iterator[list[str]]:
    require_root()
    require_tool("pvcreate", "losetup")
    devices: list[str] = []
    try:
        for img in images:
            devices.append(run(["losetup", "-f", "--show", str(img)]).strip())
        yield devices
    finally:
        for dev in devices:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


@pytest.fixture
def lvm(tmp_path: Path) -> Lvm:
    conf = tmp_path / "lvmconf"
    conf.mkdir()
    (conf / "lvm.conf").write_text(LVM_CONF)
    return Lvm(conf)


def expected_lvs(lvm: Lvm, vg: str, dev: str) -> dict[str, list[tuple[int, int]]]:
    """LV name → PV byte ranges of its segments, in LV order, as lvm2 reports them."""
    extent = int(lvm.report("vgs", "vg_extent_size")[0]["vg_extent_size"])
    pe_start = int(next(r for r in lvm.report("pvs", "pv_name,pe_start") if r["pv_name"] == dev)["pe_start"])
    out: dict[str, list[tuple[int, int]]] = {}
    for row in lvm.report("lvs", "lv_name,seg_pe_ranges,seg_start_pe"):
        for rng in row["seg_pe_ranges"].split():
            pv, _, span = rng.rpartition(":")
            a, _, b = span.partition("-")
            if pv == dev:
                out.setdefault(f"{vg}/{row['lv_name']}", []).append(
                    (pe_start + int(a) * extent, (int(b) - int(a) + 1) * extent)
                )
    return out


def volumes(img: Path) -> list[Volume]:
    with open_image(img, "raw") as image:
        return scan_volumes(image)


def test_linear_volumes_match_lvs(tmp_path: Path, lvm: Lvm) -> None:
    img = tmp_path / "pv.img"
    with open(img, "wb") as f:
        f.truncate(200 * MIB)
    with loops(img) as [dev]:
        lvm("pvcreate", "-y", dev)
        lvm("vgcreate", "-s", "1m", "vg0", dev)
        lvm("lvcreate", "-an", "-Zn", "-L", "40M", "-n", "root", "vg0")
        lvm("lvcreate", "-an", "-Zn", "-L", "20M", "-n", "home", "vg0")
        lvm("lvcreate", "-an", "-Zn", "-L", "8M", "-n", "grown", "vg0")
        lvm("lvcreate", "-an", "-Zn", "-L", "4M", "-n", "spacer", "vg0")
        lvm("lvextend", "-L", "+6M", "vg0/grown")  # a second, non-contiguous piece
        want = expected_lvs(lvm, "vg0", dev)
    got = {v.name: v for v in volumes(img) if v.scheme == "lvm"}
    assert set(got) == set(want)
    for name, pieces in want.items():
        if len(pieces) == 1:
            assert got[name].skip_reason is None, got[name].skip_reason
            assert (got[name].start, got[name].length) == pieces[0]
        else:
            assert got[name].skip_reason and "separate pieces" in got[name].skip_reason
    whole = volumes(img)[0]
    assert whole.content == "LVM2_member" and whole.skip_reason and "listed after it" in whole.skip_reason


def test_striped_and_multi_pv_volumes_are_skipped(tmp_path: Path, lvm: Lvm) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for img in (a, b):
        with open(img, "wb") as f:
            f.truncate(64 * MIB)
    with loops(a, b) as [da, db]:
        lvm("pvcreate", "-y", da, db)
        lvm("vgcreate", "-s", "1m", "vg1", da, db)
        lvm("lvcreate", "-an", "-Zn", "-i", "2", "-I", "64k", "-L", "8M", "-n", "striped", "vg1")
        lvm("lvcreate", "-an", "-Zn", "-L", "80M", "-n", "spans", "vg1")  # fills a, continues on b
        lvm("lvcreate", "-an", "-Zn", "-L", "4M", "-n", "plain", "vg1", db)
    got = {v.name: v.skip_reason for v in volumes(a) if v.scheme == "lvm"}
    assert got["vg1/striped"] and "several stripes" in got["vg1/striped"]
    assert got["vg1/spans"] and "another physical volume" in got["vg1/spans"]
    assert got["vg1/plain"] and "another physical volume" in got["vg1/plain"]
    got_b = {v.name: v.skip_reason for v in volumes(b) if v.scheme == "lvm"}
    assert got_b["vg1/plain"] is None


@pytest.fixture
def ext4_in_lv(tmp_path: Path, lvm: Lvm) -> tuple[Path, GuestDisk]:
    """A 96 MiB PV whose LV ``vg2/data`` (after a 4 MiB LV) holds an ext4 with files."""
    img = tmp_path / "pv.img"
    with open(img, "wb") as f:
        f.truncate(96 * MIB)
    with loops(img) as [dev]:
        lvm("pvcreate", "-y", dev)
        lvm("vgcreate", "-s", "1m", "vg2", dev)
        lvm("lvcreate", "-an", "-Zn", "-L", "4M", "-n", "first", "vg2")
        lvm("lvcreate", "-an", "-Zn", "-L", "48M", "-n", "data", "vg2")
        [(offset, length)] = expected_lvs(lvm, "vg2", dev)["vg2/data"]
    files = make_files(tmp_path / "src", 30, seed=6)
    fs = tmp_path / "fs.img"
    mkfs(fs, length, tmp_path / "src", "ext4", "-b", "4096")
    run(
        [
            "dd",
            f"if={fs}",
            f"of={img}",
            "bs=1M",
            f"seek={offset // MIB}",
            "conv=notrunc,sparse",
            "status=none",
        ]
    )
    fs.unlink()
    disk = GuestDisk(img, offset, 4096, files)
    delete(disk, sorted(files)[::2])
    return img, disk


@pytest.mark.qemu
def test_sparsify_reads_ext4_inside_an_lv(
    ext4_in_lv: tuple[Path, GuestDisk], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img, disk = ext4_in_lv
    before = allocated(img)
    code = main(["image", "sparsify", str(img), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    [lv] = [f for f in doc["filesystems"] if f["type"] == "ext4"]
    assert lv["skipped"] is None
    assert lv["free_bytes"] == dumpe2fs_free(disk.fs_spec, 4096).total
    assert allocated(img) < before
    proc = subprocess.run(["e2fsck", "-fn", disk.fs_spec], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout
    assert_files_intact(disk, tmp_path / "out")
    # The PV's metadata and the other LV are untouched: lvm2 still reads the same VG.
    with open(img, "rb") as f:
        assert b"LABELONE" in f.read(2048)


# -- refusals and damage -----------------------------------------------------------------------


def metadata_area(img: Path) -> tuple[int, int, int]:
    """Byte offsets of the first metadata area, its current text, and the text's size."""
    with open(img, "rb") as f:
        head = f.read(4096)
    label = head.index(b"LABELONE")
    (pvh,) = struct.unpack_from("<I", head, label + 20)
    pos = label + pvh + 40
    while struct.unpack_from("<Q", head, pos)[0]:
        pos += 16
    pos += 16
    (mda,) = struct.unpack_from("<Q", head, pos)
    with open(img, "rb") as f:
        f.seek(mda)
        hdr = f.read(512)
    offset, size = struct.unpack_from("<QQ", hdr, 40)
    return mda, mda + offset, size


def test_metadata_checksum_mismatch_skips_the_pv(ext4_in_lv: tuple[Path, GuestDisk]) -> None:
    img, _ = ext4_in_lv
    _, text, _ = metadata_area(img)
    with open(img, "r+b") as f:
        f.seek(text + 40)
        byte = f.read(1)
        f.seek(text + 40)
        f.write(bytes([byte[0] ^ 0x20]))
    vols = volumes(img)
    assert [v.scheme for v in vols] == ["none"]
    assert vols[0].skip_reason and "fails its CRC" in vols[0].skip_reason


def test_overlapping_lvs_skip_the_pv(ext4_in_lv: tuple[Path, GuestDisk]) -> None:
    """Metadata rewritten (with valid checksums) so two LVs share extents."""
    img, _ = ext4_in_lv
    mda, text_at, size = metadata_area(img)
    with open(img, "rb") as f:
        f.seek(text_at)
        text = f.read(size)
    doc = parse(text.rstrip(b"\0").decode())
    assert "vg2" in doc
    edited = text.replace(b'stripes = [\n"pv0", 4\n]', b'stripes = [\n"pv0", 2\n]')
    if edited == text:  # lvm2's layout of the list differs: edit the number after "pv0"
        i = text.rindex(b'"pv0", ') + len(b'"pv0", ')
        edited = text[:i] + b"2" + text[i + 1 :]
    assert len(edited) == len(text)
    with open(img, "r+b") as f:
        f.seek(text_at)
        f.write(edited)
        f.seek(mda)
        hdr = bytearray(f.read(512))
        struct.pack_into("<I", hdr, 56, lvm_crc(edited))
        struct.pack_into("<I", hdr, 0, lvm_crc(bytes(hdr[4:])))
        f.seek(mda)
        f.write(hdr)
    vols = volumes(img)
    assert vols[0].skip_reason and "share extents" in vols[0].skip_reason, vols[0].skip_reason
    assert all(v.scheme != "lvm" for v in vols)


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 9000), st.integers(1, 255)), min_size=1, max_size=3))
def test_damaged_metadata_never_moves_a_volume(
    tmp_path_factory: pytest.TempPathFactory, flips: list[tuple[int, int]]
) -> None:
    """Bytes of the label, PV header, mda header and metadata text change: the PV is
    skipped, or every readable LV is exactly where lvm2 put it."""
    img = _FUZZ.get("img")
    if img is None:
        pytest.skip("needs test_linear_volumes_match_lvs's image (run the module)")
    truth = _FUZZ["truth"]
    assert isinstance(img, Path) and isinstance(truth, dict)
    _, text_at, _ = metadata_area(img)
    saved = []
    with open(img, "r+b") as f:
        for where, xor in flips:
            at = where if where < 4096 else text_at + where - 4096
            f.seek(at)
            old = f.read(1)[0]
            saved.append((at, old))
            f.seek(at)
            f.write(bytes([old ^ xor]))
    try:
        try:
            vols = volumes(img)
        except VMReclaimError:
            return
        for v in vols:
            if v.scheme == "lvm" and v.skip_reason is None:
                assert truth.get(v.name) == (v.start, v.length), f"flips {flips}: {v.name} moved"
    finally:
        with open(img, "r+b") as f:
            for at, old in reversed(saved):
                f.seek(at)
                f.write(bytes([old]))


_FUZZ: dict[str, object] = {}


@pytest.fixture(autouse=True, scope="module")
def _fuzz_image(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One PV with three LVs for the damage test, made once (lvm2 needs root)."""
    if os.geteuid() != 0:
        return
    tmp = tmp_path_factory.mktemp("lvmfuzz")
    conf = tmp / "conf"
    conf.mkdir()
    (conf / "lvm.conf").write_text(LVM_CONF)
    lvm = Lvm(conf)
    img = tmp / "pv.img"
    with open(img, "wb") as f:
        f.truncate(64 * MIB)
    with loops(img) as [dev]:
        lvm("pvcreate", "-y", dev)
        lvm("vgcreate", "-s", "1m", "vgf", dev)
        for name, size in (("a", "8M"), ("b", "16M"), ("c", "4M")):
            lvm("lvcreate", "-an", "-Zn", "-L", size, "-n", name, "vgf")
        truth = {k: v[0] for k, v in expected_lvs(lvm, "vgf", dev).items()}
    _FUZZ.update(img=img, truth=truth)


def test_lv_volume_reads_stay_inside_the_lv(ext4_in_lv: tuple[Path, GuestDisk]) -> None:
    img, disk = ext4_in_lv
    with open_image(img, "raw") as image:
        [lv] = [v for v in scan_volumes(image) if v.name == "vg2/data"]
        assert lv.label == "LV vg2/data" and lv.start == disk.fs_offset
        found = identify(lv)
        assert found.detection is not None and found.detection.type == "ext4"
        with pytest.raises(VMReclaimError, match="past the end of the volume"):
            lv.read(lv.length - 10, 20, "probe")


def rewrite_metadata(img: Path, edit: Callable[[bytes], bytes]) -> None:
    """Replace the current metadata text in place, with valid text and header CRCs."""
    mda, text_at, size = metadata_area(img)
    with open(img, "rb") as f:
        f.seek(text_at)
        text = f.read(size)
    new = edit(text.rstrip(b"\0")) + b"\0"
    with open(img, "r+b") as f:
        f.seek(text_at)
        f.write(new)
        f.seek(mda)
        hdr = bytearray(f.read(512))
        struct.pack_into("<QI", hdr, 48, len(new), lvm_crc(new))
        struct.pack_into("<I", hdr, 0, lvm_crc(bytes(hdr[4:])))
        f.seek(mda)
        f.write(hdr)


SNAPSHOT_AND_THIN = b"""
snap {
id = "aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
segment_count = 1
segment1 {
start_extent = 0
extent_count = 2
type = "striped"
stripe_count = 1
stripes = [
"pv0", 60
]
}
}
snapshot0 {
id = "bbbbbb-bbbb-bbbb-bbbb-bbbb-bbbb-bbbbbb"
status = ["READ"]
flags = []
segment_count = 1
segment1 {
start_extent = 0
extent_count = 48
type = "snapshot"
chunk_size = 8
origin = "data"
cow_store = "snap"
}
}
pool_tdata {
id = "cccccc-cccc-cccc-cccc-cccc-cccc-cccccc"
status = ["READ", "WRITE"]
flags = []
segment_count = 1
segment1 {
start_extent = 0
extent_count = 8
type = "striped"
stripe_count = 1
stripes = [
"pv0", 70
]
}
}
pool {
id = "dddddd-dddd-dddd-dddd-dddd-dddd-dddddd"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
segment_count = 1
segment1 {
start_extent = 0
extent_count = 8
type = "thin-pool"
metadata = "pool_tmeta"
pool = "pool_tdata"
transaction_id = 0
chunk_size = 128
}
}
"""


def test_snapshot_origins_and_pool_components_are_skipped(ext4_in_lv: tuple[Path, GuestDisk]) -> None:
    """Metadata as lvm2 writes it for a snapshot of ``data`` and a thin pool (written
    here, since lvcreate refuses those without device-mapper): the origin, the COW
    store, the pool and its data LV are all skipped; ``first`` is still read."""
    img, _ = ext4_in_lv
    rewrite_metadata(
        img, lambda t: t.replace(b"logical_volumes {\n", b"logical_volumes {\n" + SNAPSHOT_AND_THIN, 1)
    )
    got = {v.name: v.skip_reason for v in volumes(img) if v.scheme == "lvm"}
    assert got["vg2/first"] is None
    assert got["vg2/data"] and "origin" in got["vg2/data"]
    assert got["vg2/snap"] and "component" in got["vg2/snap"]
    assert got["vg2/snapshot0"] and "'snapshot'" in got["vg2/snapshot0"]
    assert got["vg2/pool"] and "'thin-pool'" in got["vg2/pool"]
    assert got["vg2/pool_tdata"]


@pytest.mark.qemu
def test_sparsify_reads_xfs_inside_an_lv_of_a_qcow2(
    tmp_path: Path, lvm: Lvm, capsys: pytest.CaptureFixture[str]
) -> None:
    """XFS written through the kernel into an LV's byte range (a loop device with an
    offset, as device-mapper would present it), half its files deleted, the disk
    converted to qcow2 and sparsified; the LV's XFS is then clean and its files intact."""
    require_tool("mkfs.xfs", "xfs_repair", "qemu-img")
    img = tmp_path / "pv.img"
    with open(img, "wb") as f:
        f.truncate(360 * MIB)
    with loops(img) as [dev]:
        lvm("pvcreate", "-y", dev)
        lvm("vgcreate", "-s", "1m", "vg3", dev)
        lvm("lvcreate", "-an", "-Zn", "-L", "8M", "-n", "boot", "vg3")
        lvm("lvcreate", "-an", "-Zn", "-L", "330M", "-n", "root", "vg3")
        [(offset, length)] = expected_lvs(lvm, "vg3", dev)["vg3/root"]
    files = {f"f{i:03d}": os.urandom(int(40_000 + 9_000 * i)) for i in range(40)}
    gone = sorted(files)[::2]
    lv = run(["losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(length), str(img)]).strip()
    try:
        run(["mkfs.xfs", "-q", "-f", lv])
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        run(["mount", lv, str(mnt)])
        try:
            for name, data in files.items():
                (mnt / name).write_bytes(data)
            subprocess.run(["sync"], check=True)
            for name in gone:
                (mnt / name).unlink()
        finally:
            run(["umount", str(mnt)])
    finally:
        subprocess.run(["losetup", "-d", lv], capture_output=True, check=False)
    qcow = tmp_path / "disk.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(img), str(qcow)])
    before = allocated(qcow)
    code = main(["image", "sparsify", str(qcow), "--format", "qcow2", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    [fs] = [f for f in json.loads(out.out)["filesystems"] if f["type"] == "xfs"]
    assert fs["skipped"] is None and fs["start"] == offset
    deleted = sum(len(files[n]) for n in gone)
    assert before - allocated(qcow) >= 0.9 * deleted
    back = tmp_path / "back.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow), str(back)])
    lv_image = tmp_path / "lv.raw"
    run(
        [
            "dd",
            f"if={back}",
            f"of={lv_image}",
            "bs=1M",
            f"skip={offset // MIB}",
            f"count={length // MIB}",
            "status=none",
        ]
    )
    proc = subprocess.run(
        ["xfs_repair", "-n", "-f", str(lv_image)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from vmreclaim.testing.linux import loop_mounted

    with loop_mounted(lv_image, tmp_path / "ro", options=["ro,norecovery"]) as (_dev, mnt):
        for name, data in files.items():
            if name not in gone:
                assert (mnt / name).read_bytes() == data, f"{name} changed"
