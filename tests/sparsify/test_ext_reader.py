"""The ext2/3/4 reader against ``dumpe2fs`` on every layout feature, and its refusals.

The free set must equal what e2fsprogs computes from the same bitmaps (including
BLOCK_UNINIT groups, meta_bg descriptors and bigalloc clusters); every condition under
which on-disk bitmaps may not be the truth must refuse with exit 4 (or 3 when the
filesystem is in use) and change nothing.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmreclaim.cli import main
from vmreclaim.core.errors import CorruptImageError, ImageBusyError, UnsupportedImageError, VMReclaimError
from vmreclaim.core.filesystems import identify
from vmreclaim.core.opening import open_image
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.volumes import scan_volumes
from vmreclaim.plugins.filesystems.checksums import crc16, crc32c, crc32c_rows
from vmreclaim.testing import require_root, require_tool, run

from .disks import MIB, GuestDisk, delete, dumpe2fs_free, make_files, mkfs

LAYOUTS = {
    "ext4-1k": ("ext4", ["-b", "1024"]),
    "ext4-4k": ("ext4", ["-b", "4096"]),
    "ext4-noflex": ("ext4", ["-O", "^flex_bg"]),
    "ext4-no64bit": ("ext4", ["-O", "^64bit"]),
    "ext4-metabg": ("ext4", ["-O", "meta_bg,^resize_inode"]),
    "ext4-metabg-4k-noflex": ("ext4", ["-b", "4096", "-O", "meta_bg,^resize_inode,^flex_bg"]),
    "ext4-bigalloc-4k": ("ext4", ["-b", "4096", "-O", "bigalloc", "-C", "16384"]),
    "ext4-bigalloc-1k-metabg": ("ext4", ["-b", "1024", "-O", "bigalloc,meta_bg,^resize_inode", "-C", "4096"]),
    "ext4-uninit_bg-crc16": ("ext4", ["-O", "^metadata_csum,uninit_bg"]),
    "ext4-sparse_super2": ("ext4", ["-O", "sparse_super2"]),
    "ext4-no-sparse_super": ("ext4", ["-O", "^sparse_super,^resize_inode"]),
    "ext4-mmp": ("ext4", ["-O", "mmp"]),
    "ext4-csum_seed": ("ext4", ["-O", "metadata_csum_seed"]),
    "ext3": ("ext3", []),
    "ext2": ("ext2", []),
}


def free_space(path: Path) -> tuple[str, RangeSet, int]:
    with open_image(path, "raw") as image:
        [volume] = scan_volumes(image)
        found = identify(volume)
        assert found.reader is not None and found.detection is not None, found.skip_reason
        space = found.reader.free_space(volume, found.detection)
        return found.detection.type, space.free, space.block_size


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    make_files(src, 50, seed=3, max_size=200 * 1024)
    return src


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_free_blocks_match_dumpe2fs(tmp_path: Path, files: Path, name: str) -> None:
    require_tool("mkfs.ext4", "dumpe2fs", "debugfs")
    fstype, options = LAYOUTS[name]
    img = tmp_path / "fs.img"
    # 300 MiB: many block groups (and BLOCK_UNINIT ones) even with 4 KiB blocks' flex groups.
    mkfs(img, 300 * MIB, files, fstype, *options)
    disk = GuestDisk(img, 0, 1024, {"/" + p.relative_to(files).as_posix(): b"" for p in files.rglob("f*")})
    delete(disk, sorted(disk.files)[::3])
    kind, free, cluster = free_space(img)
    assert kind == fstype
    expected = dumpe2fs_free(str(img), cluster)
    assert free.total > 0
    assert free == expected, f"extra {free - expected!r}, missing {expected - free!r}"


def test_checksums_known_vectors() -> None:
    # CRC-32C check value (RFC 3720) and the CRC-16/ARC check value, in raw form.
    assert crc32c(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    assert crc16(0, b"123456789") == 0xBB3D
    rows = np.frombuffer(b"123456789" * 3, dtype=np.uint8).reshape(3, 9)
    seeds = np.array([0xFFFFFFFF, 0, 0x1234], dtype=np.uint32)
    got = crc32c_rows(seeds, rows)
    assert [int(x) for x in got] == [crc32c(int(s), b"123456789") for s in seeds]


# -- refusals --------------------------------------------------------------------------


@pytest.fixture
def ext4(tmp_path: Path, files: Path) -> Path:
    img = tmp_path / "fs.img"
    mkfs(img, 32 * MIB, files, "ext4", "-b", "1024")
    return img


def sparsify(capsys: pytest.CaptureFixture[str], img: Path) -> tuple[int, str]:
    code = main(["image", "sparsify", str(img), "--json"])
    captured = capsys.readouterr()
    return code, captured.err


def unchanged(img: Path) -> tuple[bytes, int]:
    return img.read_bytes(), img.stat().st_blocks


def test_journal_needing_recovery_is_refused(ext4: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(["debugfs", "-w", "-R", "feature needs_recovery", str(ext4)])
    before = unchanged(ext4)
    code, err = sparsify(capsys, ext4)
    assert code == 4
    assert "journal needs recovery" in err and str(ext4) in err
    assert unchanged(ext4) == before


@pytest.mark.root
def test_image_of_a_mounted_filesystem_is_refused(
    tmp_path: Path, ext4: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A copy taken while a (guest) kernel has the filesystem mounted and dirty."""
    require_root()
    from vmreclaim.testing.linux import loop_mounted

    copy = tmp_path / "copy.img"
    with loop_mounted(ext4, tmp_path / "mnt") as (_dev, mnt):
        (mnt / "new").write_bytes(b"x" * 100_000)
        subprocess.run(["sync"], check=True)
        run(["cp", "--sparse=always", str(ext4), str(copy)])
    code, err = sparsify(capsys, copy)
    assert code == 4
    assert "needs recovery" in err or "not cleanly unmounted" in err


@pytest.mark.parametrize(
    ("state", "message"), [(0, "not cleanly unmounted"), (3, "recorded errors"), (5, "not cleanly unmounted")]
)
def test_unclean_state_is_refused(
    ext4: Path, capsys: pytest.CaptureFixture[str], state: int, message: str
) -> None:
    run(["debugfs", "-w", "-R", f"ssv state {state}", str(ext4)])
    code, err = sparsify(capsys, ext4)
    assert code == 4 and message in err


def patch(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def superblock_field(img: Path, offset: int, fmt: str) -> int:
    with open(img, "rb") as f:
        f.seek(1024 + offset)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


def test_unknown_incompatible_feature_is_refused(ext4: Path, capsys: pytest.CaptureFixture[str]) -> None:
    incompat = superblock_field(ext4, 0x60, "<I")
    patch(ext4, 1024 + 0x60, struct.pack("<I", incompat | 0x80000000))
    code, err = sparsify(capsys, ext4)
    # metadata_csum catches the edit first; either way nothing is read past it.
    assert code == 4 and ("checksum" in err or "incompatible features" in err)


def test_bad_bitmap_checksum_is_refused(ext4: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run(["dumpe2fs", str(ext4)])
    bitmap = int(out.split("Block bitmap at ")[1].split()[0])
    before_alloc = ext4.stat().st_blocks
    patch(ext4, bitmap * 1024 + 500, b"\x00\x00")
    code, err = sparsify(capsys, ext4)
    assert code == 4 and "block bitmap of group 0" in err and "checksum" in err
    assert ext4.stat().st_blocks == before_alloc


def test_bitmap_freer_than_its_descriptor_is_refused(
    tmp_path: Path, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ext2 has no checksums: the descriptor's free count is the only cross-check."""
    img = tmp_path / "ext2.img"
    mkfs(img, 32 * MIB, files, "ext2", "-b", "1024")
    out = run(["dumpe2fs", str(img)])
    group1 = out.split("Group 1:")[1]
    bitmap = int(group1.split("Block bitmap at ")[1].split()[0])
    # Clear in-use bits of group 1 (its inode table and the files' data are there).
    patch(img, bitmap * 1024 + 64, bytes(256))
    code, err = sparsify(capsys, img)
    assert code == 4 and "group 1" in err and "descriptor counts" in err


def test_bad_descriptor_checksum_is_refused(ext4: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Group descriptors of a 1 KiB-block filesystem start at block 2; flip a flag bit.
    with open(ext4, "r+b") as f:
        f.seek(2048 + 0x12)
        flags = f.read(1)[0]
        f.seek(2048 + 0x12)
        f.write(bytes([flags ^ 0x04]))
    code, err = sparsify(capsys, ext4)
    assert code == 4 and "group 0 descriptor checksum" in err


def test_filesystem_larger_than_its_volume_is_refused(tmp_path: Path, files: Path) -> None:
    img = tmp_path / "fs.img"
    mkfs(img, 32 * MIB, files, "ext4")
    with open(img, "r+b") as f:
        f.truncate(24 * MIB)
    with open_image(img, "raw") as image:
        [volume] = scan_volumes(image)
        found = identify(volume)
        assert found.reader is not None and found.detection is not None
        with pytest.raises(CorruptImageError, match="volume holds"):
            found.reader.free_space(volume, found.detection)


def test_mmp_in_use_is_busy(tmp_path: Path, files: Path) -> None:
    img = tmp_path / "fs.img"
    mkfs(img, 32 * MIB, files, "ext4", "-O", "mmp")
    mmp_block = superblock_field(img, 0x168, "<Q")
    block = 1024 << superblock_field(img, 0x18, "<I")
    patch(img, mmp_block * block + 4, struct.pack("<I", 0x1234))  # a live node's sequence
    with open_image(img, "raw") as image:
        [volume] = scan_volumes(image)
        found = identify(volume)
        assert found.reader is not None and found.detection is not None
        with pytest.raises(ImageBusyError, match="in use by another node"):
            found.reader.free_space(volume, found.detection)


def test_snapshot_feature_is_refused(ext4: Path) -> None:
    run(["debugfs", "-w", "-R", "feature ^metadata_csum", str(ext4)])
    ro = superblock_field(ext4, 0x64, "<I")
    patch(ext4, 1024 + 0x64, struct.pack("<I", ro | 0x0080))
    with open_image(ext4, "raw") as image:
        [volume] = scan_volumes(image)
        found = identify(volume)
        assert found.reader is not None and found.detection is not None
        with pytest.raises(UnsupportedImageError, match="snapshots"):
            found.reader.free_space(volume, found.detection)


def test_garbage_with_ext_magic_is_not_an_ext_filesystem(tmp_path: Path) -> None:
    img = tmp_path / "junk.img"
    rng = np.random.default_rng(5)
    data = bytearray(rng.integers(0, 256, size=4 * MIB, dtype=np.uint8).tobytes())
    data[1024 + 0x38 : 1024 + 0x3A] = struct.pack("<H", 0xEF53)
    data[1024 + 0x18 : 1024 + 0x1C] = struct.pack("<I", 99)  # impossible block size
    img.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "vmreclaim", "image", "sparsify", str(img), "--json", "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"no supported filesystem signature found"' in proc.stdout


# -- hostile metadata ------------------------------------------------------------------

_FUZZ_FS: dict[str, tuple[bytes, RangeSet]] = {}


def _pristine(kind: str, tmp: Path, files: Path) -> tuple[bytes, RangeSet]:
    """A small filesystem (1 KiB blocks, many groups) and its true free set, cached."""
    if kind not in _FUZZ_FS:
        img = tmp / f"pristine-{kind}.img"
        fstype, options = {
            "ext4": ("ext4", ["-b", "1024", "-O", "^flex_bg"]),
            "ext2": ("ext2", ["-b", "1024"]),
        }[kind]
        mkfs(img, 24 * MIB, files, fstype, *options)
        _FUZZ_FS[kind] = (img.read_bytes(), free_space(img)[1])
    return _FUZZ_FS[kind]


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["ext4", "ext2"]),
    # Offsets inside the first groups' metadata: superblock, descriptors, reserved GDT,
    # bitmaps and the start of the inode tables (1 KiB blocks).
    flips=st.lists(st.tuples(st.integers(1024, 300 * 1024), st.integers(1, 255)), min_size=1, max_size=3),
)
def test_corrupted_metadata_never_frees_a_used_block(
    tmp_path_factory: pytest.TempPathFactory, files: Path, kind: str, flips: list[tuple[int, int]]
) -> None:
    """Whatever bytes of the metadata change, the reader refuses (an image error) or
    returns a free set inside the true one: corruption never makes a used block free.
    ext4 has checksums; ext2 has only the count and layout cross-checks."""
    tmp = tmp_path_factory.getbasetemp()
    data, truth = _pristine(kind, tmp, files)
    img = tmp / f"fuzz-{kind}.img"
    damaged = bytearray(data)
    for offset, xor in flips:
        damaged[offset] ^= xor
    img.write_bytes(bytes(damaged))
    try:
        _, free, _ = free_space(img)
    except (VMReclaimError, AssertionError):
        return  # refused, or not recognised as ext at all: nothing would be punched
    extra = free - truth
    assert not extra, f"{kind}: flips {flips} made {extra.total} used bytes look free: {extra!r}"
