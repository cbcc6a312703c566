"""The FAT12/16/32 reader against ``fsck.fat -n``, its refusals, and sparsify end to end.

Filesystems are made by ``mkfs.fat`` and filled and fragmented by mtools (``mcopy``,
``mdel``): no vfat kernel module is needed. The oracle for the free count is
``fsck.fat -n`` (dosfstools), which walks every directory and chain itself; the
end-to-end cases prove with ``mcopy`` that every surviving file reads back identical
after the punch, and that ``fsck.fat -n`` still finds nothing.
"""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmreclaim.cli import main
from vmreclaim.core.errors import VMReclaimError
from vmreclaim.core.filesystems import identify
from vmreclaim.core.opening import open_image
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.volumes import scan_volumes
from vmreclaim.testing import require_tool, run

from .disks import MIB, allocated, convert, make_files, to_raw

LAYOUTS = {
    "fat12-512": (8 * MIB, ["-F", "12", "-s", "4"]),
    "fat12-2k": (4 * MIB, ["-F", "12", "-s", "4", "-S", "512"]),
    "fat16-1k": (40 * MIB, ["-F", "16", "-s", "2"]),
    "fat16-4k": (120 * MIB, ["-F", "16", "-s", "8"]),
    "fat16-one-fat": (40 * MIB, ["-F", "16", "-s", "2", "-f", "1"]),
    "fat32-512": (48 * MIB, ["-F", "32", "-s", "1"]),
    "fat32-4k": (300 * MIB, ["-F", "32", "-s", "8"]),
    "fat32-4k-sectors": (300 * MIB, ["-F", "32", "-S", "4096", "-s", "1"]),
    "fat32-1k": (100 * MIB, ["-F", "32", "-s", "2"]),
}


def mkfat(path: Path, size: int, options: list[str]) -> None:
    require_tool("mkfs.fat", "mcopy", "fsck.fat")
    with open(path, "wb") as f:
        f.truncate(size)
    run(["mkfs.fat", *options, str(path)])


def populate(img: Path, src: Path, files: dict[str, bytes], delete_every: int = 2) -> dict[str, bytes]:
    """Copy ``files`` in with ``mcopy``, then ``mdel`` every ``delete_every``-th one
    (fragmenting the free space); returns the survivors."""
    run(["mmd", "-i", str(img), "::dir"])
    names = sorted(files)
    run(
        [
            "mcopy",
            "-i",
            str(img),
            *[str(src / n.strip("/")) for n in names if not n.startswith("/dir/")],
            "::/",
        ]
    )
    run(
        [
            "mcopy",
            "-i",
            str(img),
            *[str(src / n.strip("/")) for n in names if n.startswith("/dir/")],
            "::/dir/",
        ]
    )
    gone = names[::delete_every]
    if gone:
        run(["mdel", "-i", str(img), *[f"::{n}" for n in gone]])
    return {n: files[n] for n in names if n not in gone}


def fsck_fat(img: Path) -> tuple[int, int]:
    """Used and total clusters as ``fsck.fat -n`` counts them; asserts it is clean."""
    proc = subprocess.run(["fsck.fat", "-n", str(img)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"fsck.fat -n found problems:\n{proc.stdout}{proc.stderr}"
    m = re.search(r"(\d+)/(\d+) clusters", proc.stdout)
    assert m, proc.stdout
    return int(m.group(1)), int(m.group(2))


def free_space(path: Path, fmt: str = "raw") -> tuple[RangeSet, int]:
    with open_image(path, fmt) as image:
        [volume] = scan_volumes(image)
        found = identify(volume)
        assert found.reader is not None and found.detection is not None, found.skip_reason
        assert found.skip_reason is None, found.skip_reason
        space = found.reader.free_space(volume, found.detection)
        return space.free, space.block_size


def assert_files_intact(img: Path, files: dict[str, bytes], scratch: Path) -> None:
    scratch.mkdir(exist_ok=True)
    for name, data in files.items():
        out = scratch / name.strip("/").replace("/", "_")
        run(["mcopy", "-n", "-i", str(img), f"::{name}", str(out)])
        assert out.read_bytes() == data, f"{name} changed"


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("src")
    return root, make_files(root, 40, seed=11, max_size=120 * 1024)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_free_clusters_match_fsck_fat(tmp_path: Path, src: tuple[Path, dict[str, bytes]], name: str) -> None:
    size, options = LAYOUTS[name]
    img = tmp_path / "fat.img"
    mkfat(img, size, options)
    root, files = src
    if size < 10 * MIB:  # FAT12 volumes are small: fewer, smaller files
        files = {n: d for n, d in files.items() if len(d) < 40 * 1024}
    populate(img, root, files, delete_every=2)
    used, total = fsck_fat(img)
    free, cluster = free_space(img)
    assert free.total > 0
    assert free.total // cluster == total - used
    assert ((free.ends - free.starts) % cluster == 0).all()


# -- refusals ---------------------------------------------------------------------------


def patch(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def boot_fields(img: Path) -> tuple[int, int, int, int]:
    """Sector size, reserved sectors, FAT count and sectors per FAT."""
    with open(img, "rb") as f:
        boot = f.read(512)
    sector, _spc, reserved, fats, _root, _t16, _m, fat16 = struct.unpack_from("<HBHBHHBH", boot, 0x0B)
    return sector, reserved, fats, fat16 or struct.unpack_from("<I", boot, 0x24)[0]


def chain_target(img: Path) -> int:
    """The first cluster some allocated entry links to (a chain's second cluster)."""
    sector, reserved, _fats, size = boot_fields(img)
    width = 4 if size > 200 else 2  # the fixtures' FAT32 tables are larger than 200 sectors
    with open(img, "rb") as f:
        f.seek(reserved * sector)
        table = f.read(size * sector)
    fmt = "<I" if width == 4 else "<H"
    entries = [struct.unpack_from(fmt, table, i * width)[0] & 0x0FFFFFFF for i in range(3, 4000)]
    return next(e for e in entries if 2 < e < 0xFFF0)


@pytest.fixture(params=["fat16", "fat32"])
def fat(request: pytest.FixtureRequest, tmp_path: Path, src: tuple[Path, dict[str, bytes]]) -> Path:
    img = tmp_path / "fat.img"
    mkfat(img, 40 * MIB, ["-F", request.param[3:], "-s", "2" if request.param == "fat16" else "1"])
    populate(img, *src)
    return img


def sparsify(capsys: pytest.CaptureFixture[str], img: Path, *args: str) -> tuple[int, str, str]:
    code = main(["image", "sparsify", str(img), "--json", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fat_copies_that_differ_are_refused(fat: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sector, reserved, _fats, size = boot_fields(fat)
    width = 4 if size > 200 else 2
    target = chain_target(fat)
    patch(fat, (reserved + size) * sector + target * width, bytes(width))  # FAT 2: free
    before = fat.read_bytes(), allocated(fat)
    code, _, err = sparsify(capsys, fat)
    assert code == 4 and "FAT 2 differs from FAT 1" in err
    assert (fat.read_bytes(), allocated(fat)) == before


def test_chain_into_a_free_cluster_is_refused(fat: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both copies edited alike: a file's cluster marked free while its chain still
    reaches it; the reader must not believe the free entry."""
    sector, reserved, fats, size = boot_fields(fat)
    width = 4 if size > 200 else 2
    target = chain_target(fat)
    for i in range(fats):
        patch(fat, (reserved + i * size) * sector + target * width, bytes(width))
    code, _, err = sparsify(capsys, fat)
    assert code == 4 and "runs into a free cluster" in err


@pytest.mark.parametrize("offset", [0x25, 0x41])
def test_dirty_boot_sector_is_refused(fat: Path, capsys: pytest.CaptureFixture[str], offset: int) -> None:
    is32 = boot_fields(fat)[3] > 200
    if (offset == 0x41) != is32:
        pytest.skip("dirty byte of the other FAT type")
    with open(fat, "rb") as f:
        f.seek(offset)
        value = f.read(1)[0]
    patch(fat, offset, bytes([value | 1]))
    code, _, err = sparsify(capsys, fat)
    assert code == 4 and "dirty" in err


def test_unclean_shutdown_bit_is_refused(fat: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sector, reserved, fats, size = boot_fields(fat)
    is32 = size > 200
    for i in range(fats):
        at = (reserved + i * size) * sector + (7 if is32 else 3)
        with open(fat, "rb") as f:
            f.seek(at)
            value = f.read(1)[0]
        patch(fat, at, bytes([value & ~(0x08 if is32 else 0x80) & 0xFF]))
    code, _, err = sparsify(capsys, fat)
    assert code == 4 and "not cleanly unmounted" in err


# -- hostile metadata ---------------------------------------------------------------------

_PRISTINE: dict[str, tuple[bytes, RangeSet, int]] = {}


def _pristine(kind: str, tmp: Path, src: tuple[Path, dict[str, bytes]]) -> tuple[bytes, RangeSet, int]:
    if kind not in _PRISTINE:
        img = tmp / f"pristine-{kind}.img"
        size, options = {
            "fat12": (4 * MIB, ["-F", "12"]),
            "fat16": (20 * MIB, ["-F", "16"]),
            "fat32": (40 * MIB, ["-F", "32", "-s", "1"]),
        }[kind]
        mkfat(img, size, options)
        root, files = src
        populate(img, root, {n: d for n, d in files.items() if len(d) < 60 * 1024})
        free, _ = free_space(img)
        sector, reserved, fats, fat_size = boot_fields(img)
        _PRISTINE[kind] = (img.read_bytes(), free, (reserved + fats * fat_size) * sector)
    return _PRISTINE[kind]


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["fat12", "fat16", "fat32"]),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_corrupted_metadata_never_frees_a_used_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    src: tuple[Path, dict[str, bytes]],
    kind: str,
    flips: list[tuple[float, int]],
) -> None:
    """Bytes of the boot sector and the tables are changed (in one copy, or in all of
    them alike, as a careless tool would): the reader refuses, or its free set stays
    inside the true one."""
    tmp = tmp_path_factory.getbasetemp()
    data, truth, meta_end = _pristine(kind, tmp, src)
    damaged = bytearray(data)
    sector, reserved, fats, size = (
        struct.unpack_from("<H", data, 0x0B)[0],
        *struct.unpack_from("<HB", data, 0x0E),
        (struct.unpack_from("<H", data, 0x16)[0] or struct.unpack_from("<I", data, 0x24)[0]),
    )
    for where, xor in flips:
        offset = int(where * meta_end)
        damaged[offset] ^= xor
        if offset >= reserved * sector and where < 0.5:  # the same edit in every copy
            rel = (offset - reserved * sector) % (size * sector)
            for i in range(fats):
                at = (reserved + i * size) * sector + rel
                if at != offset:
                    damaged[at] = damaged[offset]
    img = tmp / f"fuzz-{kind}.img"
    img.write_bytes(bytes(damaged))
    try:
        free, _ = free_space(img)
    except (VMReclaimError, AssertionError):
        return
    extra = free - truth
    assert not extra, f"{kind}: flips {flips} made {extra.total} used bytes look free"


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("kind", ["fat16", "fat32"])
def test_sparsify_frees_deleted_files(
    tmp_path: Path,
    src: tuple[Path, dict[str, bytes]],
    kind: str,
    fmt: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    img = tmp_path / "disk.img"
    mkfat(img, 64 * MIB, ["-F", kind[3:], "-s", "4" if kind == "fat16" else "1"])
    root, files = src
    # Fill the volume, then delete half: the deleted clusters hold data the image still stores.
    survivors = populate(img, root, files, delete_every=2)
    expected_free, cluster = free_space(img)
    disk = convert(img, fmt)
    before = allocated(disk)
    driver = {"raw": "raw", "qcow2": "qcow2"}[fmt]
    code = main(["image", "sparsify", str(disk), "--format", driver, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert '"vfat"' in out.out
    freed = before - allocated(disk)
    deleted = sum(len(d) for n, d in files.items() if n not in survivors)
    assert freed >= 0.9 * deleted, f"freed {freed} of {deleted} deleted bytes"
    raw = to_raw(disk, fmt, tmp_path / "back.img")
    fsck_fat(raw)
    assert_files_intact(raw, survivors, tmp_path / "out")
    assert free_space(raw) == (expected_free, cluster)


def test_file_whose_only_cluster_is_marked_free_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A one-cluster file's end-of-chain entry zeroed in every copy: no link reaches it,
    only the directory walk notices that a file starts there."""
    img = tmp_path / "fat.img"
    mkfat(img, 40 * MIB, ["-F", "16", "-s", "2"])
    (tmp_path / "small").write_bytes(b"s" * 100)
    run(["mcopy", "-i", str(img), str(tmp_path / "small"), "::small"])
    sector, reserved, fats, size = boot_fields(img)
    with open(img, "rb") as f:
        f.seek((reserved + fats * size) * sector)
        root = f.read(512 * 32)
    at = root.index(b"SMALL      ")
    (first,) = struct.unpack_from("<H", root, at + 26)
    for i in range(fats):
        patch(img, (reserved + i * size) * sector + first * 2, b"\x00\x00")
    code, _, err = sparsify(capsys, img)
    assert code == 4 and "SMALL" in err and "marks free" in err, err
