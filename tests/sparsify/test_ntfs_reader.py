"""The NTFS reader against ntfs-3g's ``ntfsinfo``/``ntfscluster``, its refusals, and sparsify.

Volumes are made by ``mkntfs -F -Q`` on a file and filled and fragmented through an
ntfs-3g FUSE mount (write many files, delete every other). Oracles: ``ntfsinfo -m``'s
free-cluster count must equal ours, and ``ntfscluster -c`` must find no inode owning any
range we call free. End to end, every surviving file reads back identical with
``ntfscat`` and ``ntfsfix -n`` plus a read-only ntfs-3g mount find nothing wrong.
"""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmreclaim.cli import main
from vmreclaim.core.errors import VMReclaimError
from vmreclaim.core.filesystems import identify
from vmreclaim.core.opening import open_image
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.volumes import scan_volumes
from vmreclaim.testing import require_root, require_tool, run

from .disks import MIB, allocated, convert, to_raw

LAYOUTS = {
    "4k": (96 * MIB, []),
    "512": (48 * MIB, ["-c", "512"]),
    "1k": (64 * MIB, ["-c", "1024"]),
    "4k-4k-sectors": (96 * MIB, ["-c", "4096", "-s", "4096"]),
    "8k": (128 * MIB, ["-c", "8192"]),
    "64k": (256 * MIB, ["-c", "65536"]),
}


def make_files(count: int, seed: int, max_size: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {
        f"f{i:04d}": rng.integers(1, 256, size=int(rng.integers(1, max_size)), dtype=np.uint8).tobytes()
        for i in range(count)
    }


@contextmanager
def ntfs3g(img: Path, mnt: Path, *options: str) -> Iterator[Path]:
    require_root()
    mnt.mkdir(exist_ok=True)
    run(["ntfs-3g", *(["-o", ",".join(options)] if options else []), str(img), str(mnt)])
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def mkntfs(
    img: Path, size: int, options: list[str], files: dict[str, bytes], scratch: Path
) -> dict[str, bytes]:
    """An NTFS volume holding ``files`` minus every other one (deleted through ntfs-3g)."""
    require_tool("mkntfs", "ntfs-3g", "ntfsinfo", "ntfscluster")
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkntfs", "-q", "-F", "-Q", *options, str(img)], capture_output=True, check=True)
    gone = sorted(files)[::2]
    with ntfs3g(img, scratch / "mnt") as mnt:
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        for name in gone:
            (mnt / name).unlink()
    return {n: d for n, d in files.items() if n not in gone}


def free_space(path: Path) -> tuple[RangeSet, int]:
    with open_image(path, "raw") as image:
        [volume] = scan_volumes(image)
        found = identify(volume)
        assert found.reader is not None and found.detection is not None, found.skip_reason
        assert found.skip_reason is None, found.skip_reason
        space = found.reader.free_space(volume, found.detection)
        return space.free, space.block_size


def ntfsinfo_free(img: Path) -> int:
    out = run(["ntfsinfo", "-m", str(img)])
    m = re.search(r"Free Clusters:\s+(\d+)", out)
    assert m, out
    return int(m.group(1))


def assert_files_intact(img: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        got = subprocess.run(["ntfscat", str(img), f"/{name}"], capture_output=True, check=True).stdout
        assert got == data, f"{name} changed"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_free_clusters_match_ntfs3g(tmp_path: Path, name: str) -> None:
    size, options = LAYOUTS[name]
    img = tmp_path / "ntfs.img"
    mkntfs(img, size, options, make_files(80, len(name), 256 * 1024), tmp_path)
    free, cluster = free_space(img)
    assert free.total // cluster == ntfsinfo_free(img)
    # No inode owns any cluster we call free (ntfscluster walks every inode's runlists).
    for r in free:
        a, b = r.start // cluster, r.end // cluster - 1
        out = run(["ntfscluster", "-c", f"{a}-{b}", str(img)])
        assert "no inode found" in out, f"clusters {a}-{b}: {out}"


# -- refusals -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ntfs")
    img = tmp / "pristine.img"
    mkntfs(img, 64 * MIB, ["-c", "1024"], make_files(60, 4, 64 * 1024), tmp)
    return img


class Layout:
    """Where things are in the pristine volume (read with struct, not with the reader)."""

    def __init__(self, img: Path) -> None:
        with open(img, "rb") as f:
            boot = f.read(512)
        sector, spc = struct.unpack_from("<HB", boot, 0x0B)
        self.cluster = sector * spc
        mft_lcn, mirr_lcn = struct.unpack_from("<QQ", boot, 0x30)
        (cpr,) = struct.unpack_from("<b", boot, 0x40)
        self.record = cpr * self.cluster if cpr > 0 else 1 << -cpr
        self.mft = mft_lcn * self.cluster
        self.mirror = mirr_lcn * self.cluster

    def record_at(self, n: int) -> int:
        return self.mft + n * self.record  # the first records are contiguous after mkntfs


def copy_of(src: Path, dest: Path) -> Path:
    run(["cp", "--sparse=always", str(src), str(dest)])
    return dest


def patch(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def sparsify(capsys: pytest.CaptureFixture[str], img: Path) -> tuple[int, str]:
    code = main(["image", "sparsify", str(img), "--json"])
    return code, capsys.readouterr().err


def attribute_value(img: Path, record: int, kind: int) -> int:
    """Byte offset in the image of the value of the first resident attribute ``kind``."""
    lay = Layout(img)
    at = lay.record_at(record)
    with open(img, "rb") as f:
        f.seek(at)
        rec = f.read(lay.record)
    (pos,) = struct.unpack_from("<H", rec, 20)
    while True:
        typ, length = struct.unpack_from("<II", rec, pos)
        assert typ != 0xFFFFFFFF
        if typ == kind:
            (value,) = struct.unpack_from("<H", rec, pos + 20)
            return at + pos + value
        pos += length


def test_dirty_volume_is_refused(tmp_path: Path, pristine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = copy_of(pristine, tmp_path / "ntfs.img")
    flags = attribute_value(img, 3, 0x70) + 10
    assert flags % 512 < 510  # not a fixup position
    patch(img, flags, b"\x01\x00")
    before = img.read_bytes()
    code, err = sparsify(capsys, img)
    assert code == 4 and "dirty" in err, err
    assert img.read_bytes() == before


def test_mirror_mismatch_is_refused(
    tmp_path: Path, pristine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = copy_of(pristine, tmp_path / "ntfs.img")
    lay = Layout(img)
    patch(img, lay.mirror + 0x60, b"\xaa")  # a timestamp of $MFT's copy in $MFTMirr
    code, err = sparsify(capsys, img)
    assert code == 4 and "$MFTMirr does not match" in err, err


def test_torn_record_is_refused(tmp_path: Path, pristine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = copy_of(pristine, tmp_path / "ntfs.img")
    lay = Layout(img)
    patch(img, lay.record_at(6) + 510, b"\x00\x00")  # $Bitmap's record: first stride's tail
    code, err = sparsify(capsys, img)
    assert code == 4 and "update sequence" in err, err


def test_bitmap_freeing_a_file_cluster_is_refused(
    tmp_path: Path, pristine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bitmap has no checksum: a cleared bit is caught only by the runlist walk."""
    img = copy_of(pristine, tmp_path / "ntfs.img")
    out = run(["ntfsinfo", "-v", "-F", "/f0001", str(img)])
    lcn = int(re.search(r"Runlist:.*\n\s+0x0\s+0x([0-9a-f]+)", out).group(1), 16)  # type: ignore[union-attr]
    # $Bitmap's data: read its first run from ntfsinfo too.
    out = run(["ntfsinfo", "-v", "-i", "6", str(img)])
    bitmap_lcn = int(re.search(r"Runlist:.*\n\s+0x0\s+0x([0-9a-f]+)", out).group(1), 16)  # type: ignore[union-attr]
    lay = Layout(img)
    byte = bitmap_lcn * lay.cluster + lcn // 8
    with open(img, "rb") as f:
        f.seek(byte)
        value = f.read(1)[0]
    patch(img, byte, bytes([value & ~(1 << (lcn % 8)) & 0xFF]))
    code, err = sparsify(capsys, img)
    assert code == 4 and "runlist uses it" in err, err


def test_interrupted_chkdsk_logfile_is_refused(tmp_path: Path, pristine: Path) -> None:
    img = copy_of(pristine, tmp_path / "ntfs.img")
    out = run(["ntfsinfo", "-v", "-i", "2", str(img)])
    log_lcn = int(re.search(r"Runlist:.*\n\s+0x0\s+0x([0-9a-f]+)", out).group(1), 16)  # type: ignore[union-attr]
    patch(img, log_lcn * Layout(img).cluster, b"CHKD")
    with pytest.raises(VMReclaimError, match="chkdsk"):
        free_space(img)


# -- hostile metadata ------------------------------------------------------------------------

_TRUTH: dict[str, tuple[RangeSet, list[int]]] = {}


def _truth(img: Path) -> tuple[RangeSet, list[int]]:
    if str(img) not in _TRUTH:
        free, _ = free_space(img)
        lay = Layout(img)
        out = run(["ntfsinfo", "-v", "-i", "6", str(img)])
        bitmap = int(re.search(r"Runlist:.*\n\s+0x0\s+0x([0-9a-f]+)", out).group(1), 16) * lay.cluster  # type: ignore[union-attr]
        targets = [0, lay.mirror, bitmap, bitmap + 1024] + [lay.record_at(n) for n in range(0, 130)]
        _TRUTH[str(img)] = (free, targets)
    return _TRUTH[str(img)]


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(
        st.tuples(st.integers(0, 200), st.integers(0, 1023), st.integers(1, 255)), min_size=1, max_size=3
    )
)
def test_corrupted_metadata_never_frees_a_used_cluster(
    pristine: Path, flips: list[tuple[int, int, int]]
) -> None:
    """Bytes of the boot sector, MFT records (system and user files), the mirror and the
    bitmap change: the reader refuses, or its free set stays inside the true one. The
    image is damaged in place and restored (the reader never writes)."""
    truth, targets = _truth(pristine)
    saved = []
    with open(pristine, "r+b") as f:
        for which, offset, xor in flips:
            at = targets[which % len(targets)] + offset
            f.seek(at)
            old = f.read(1)[0]
            saved.append((at, old))
            f.seek(at)
            f.write(bytes([old ^ xor]))
    try:
        try:
            free, _ = free_space(pristine)
        except (VMReclaimError, AssertionError):
            return
        extra = free - truth
        assert not extra, f"flips {flips} made {extra.total} used bytes look free"
    finally:
        with open(pristine, "r+b") as f:
            for at, old in reversed(saved):
                f.seek(at)
                f.write(bytes([old]))


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_sparsify_frees_deleted_files(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "disk.img"
    files = make_files(60, 8, 600 * 1024)
    survivors = mkntfs(img, 96 * MIB, [], files, tmp_path)
    expected, _ = free_space(img)
    disk = convert(img, fmt)
    before = allocated(disk)
    code = main(["image", "sparsify", str(disk), "--format", fmt, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert '"ntfs"' in out.out
    deleted = sum(len(d) for n, d in files.items() if n not in survivors)
    freed = before - allocated(disk)
    assert freed >= 0.95 * deleted, f"freed {freed} of {deleted} deleted bytes"
    raw = to_raw(disk, fmt, tmp_path / "back.img")
    proc = subprocess.run(["ntfsfix", "-n", str(raw)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert free_space(raw)[0] == expected
    assert_files_intact(raw, survivors)
    with ntfs3g(raw, tmp_path / "ro", "ro") as mnt:
        assert sorted(p.name for p in mnt.iterdir() if p.name.startswith("f")) == sorted(survivors)


@pytest.mark.parametrize(("signature", "refused"), [(b"HIBR", True), (b"hibr", True), (b"wake", False)])
def test_hibernated_windows_is_refused(tmp_path: Path, signature: bytes, refused: bool) -> None:
    """A ``hiberfil.sys`` in the root directory starting with ``hibr`` means Windows
    will resume from memory: the on-disk state is not final (ntfs-3g refuses it too)."""
    img = tmp_path / "ntfs.img"
    with open(img, "wb") as f:
        f.truncate(48 * MIB)
    subprocess.run(["mkntfs", "-q", "-F", "-Q", str(img)], capture_output=True, check=True)
    with ntfs3g(img, tmp_path / "mnt") as mnt:
        (mnt / "hiberfil.sys").write_bytes(signature + bytes(200_000))
        (mnt / "keep").write_bytes(b"k" * 5000)
    if refused:
        with pytest.raises(VMReclaimError, match="hibernated"):
            free_space(img)
    else:
        free_space(img)
