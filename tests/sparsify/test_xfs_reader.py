"""The XFS reader against ``xfs_db -r -c 'freesp -d'``, its refusals, and sparsify end to end.

v5 filesystems are filled and fragmented through the host kernel's xfs on a loop device
(write many files, delete every other: many free extents, multi-level trees with 1 KiB
blocks); v4, which this kernel no longer mounts, is filled by ``mkfs.xfs -p`` from a
prototype file. The oracle lists every free extent (AGFL blocks included) and the free
set must equal it exactly. The end-to-end cases prove ``xfs_repair -n`` clean and every
surviving file identical after ``vmreclaim image sparsify``.
"""

from __future__ import annotations

import subprocess
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

SIZE = 320 * MIB  # mkfs.xfs's minimum is 300 MB

#: name → (mkfs options, populate through a mount (v5) or a prototype file (v4)).
LAYOUTS: dict[str, tuple[list[str], str]] = {
    "v5-4k": ([], "mount"),
    "v5-1k-deep-trees": (["-b", "size=1024", "-d", "agcount=2"], "mount"),
    "v5-agcount-2": (["-d", "agcount=2"], "mount"),
    "v5-agcount-13": (["-d", "agcount=13,size=1g"], "mount"),  # each AG must fit the 64 MiB log
    "v5-rmapbt": (["-m", "rmapbt=1"], "mount"),
    "v5-no-reflink-finobt": (["-m", "reflink=0,finobt=0"], "mount"),
    "v5-4k-sectors": (["-s", "size=4096"], "mount"),
    "v5-log-stripe-256k": (["-l", "su=256k"], "mount"),  # 256 KiB log records: 8 header BBs
    "v5-2k-proto": (["-b", "size=2048"], "proto"),
    "v4": (["-m", "crc=0"], "proto"),
    "v4-no-lazy-count": (["-m", "crc=0", "-l", "lazy-count=0"], "proto"),
    "v4-1k": (["-m", "crc=0", "-b", "size=1024", "-l", "size=64m"], "proto"),
}


def make_files(count: int, seed: int, max_size: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {
        f"f{i:04d}": rng.integers(1, 256, size=int(rng.integers(1, max_size)), dtype=np.uint8).tobytes()
        for i in range(count)
    }


def mkxfs(
    img: Path, options: list[str], files: dict[str, bytes], how: str, scratch: Path
) -> dict[str, bytes]:
    """A 320 MiB XFS holding ``files``; with ``how == "mount"`` every other file is then
    deleted through the kernel (fragmenting the free space). Returns the survivors."""
    require_tool("mkfs.xfs", "xfs_db")
    with open(img, "wb") as f:
        f.truncate(SIZE if "size=1g" not in ",".join(options) else 1024 * MIB)
    if how == "proto":
        src = scratch / "proto-src"
        src.mkdir(exist_ok=True)
        lines = ["/dev/null", "0 0", "d--755 0 0"]
        for name, data in files.items():
            (src / name).write_bytes(data)
            lines.append(f"{name} ---644 0 0 {src / name}")
        (scratch / "proto").write_text("\n".join([*lines, "$", ""]))
        run(["mkfs.xfs", "-q", "-f", *options, "-p", str(scratch / "proto"), str(img)])
        return dict(files)
    require_root()
    from vmreclaim.testing.linux import loop_mounted

    run(["mkfs.xfs", "-q", "-f", *options, str(img)])
    with loop_mounted(img, scratch / "mnt") as (_dev, mnt):
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        subprocess.run(["sync"], check=True)
        for name in sorted(files)[::2]:
            (mnt / name).unlink()
    return {n: d for n, d in files.items() if n not in sorted(files)[::2]}


def xfs_db_free(img: Path) -> RangeSet:
    """Free bytes as ``xfs_db freesp -d`` lists them (one line per extent, AGFL included)."""
    out = run(["xfs_db", "-r", "-c", "sb 0", "-c", "p blocksize agblocks", "-c", "freesp -d", str(img)])
    fields = dict(line.split(" = ") for line in out.splitlines() if " = " in line)
    block, agblocks = int(fields["blocksize"]), int(fields["agblocks"])
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    rows = [r for r in rows if len(r) == 3]
    a = np.array(rows, dtype=np.int64).reshape(-1, 3)
    starts = (a[:, 0] * agblocks + a[:, 1]) * block
    return RangeSet(starts, starts + a[:, 2] * block)


def free_space(path: Path) -> tuple[RangeSet, int]:
    with open_image(path, "raw") as image:
        [volume] = scan_volumes(image)
        found = identify(volume)
        assert found.reader is not None and found.detection is not None, found.skip_reason
        assert found.skip_reason is None, found.skip_reason
        space = found.reader.free_space(volume, found.detection)
        return space.free, space.block_size


def xfs_repair_clean(img: Path) -> None:
    proc = subprocess.run(["xfs_repair", "-n", "-f", str(img)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"xfs_repair -n found problems:\n{proc.stdout}{proc.stderr}"


def read_back(img: Path, files: dict[str, bytes], scratch: Path) -> None:
    """Every surviving file is byte-identical (read by ``xfs_db``'s own file walker is not
    available offline, so through a read-only loop mount, or ``xfs_db`` for v4)."""
    require_root()
    from vmreclaim.testing.linux import loop_mounted

    with loop_mounted(img, scratch / "ro", options=["ro,norecovery"]) as (_dev, mnt):
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data, f"{name} changed"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_free_extents_match_xfs_db(tmp_path: Path, name: str) -> None:
    options, how = LAYOUTS[name]
    files = make_files(700 if "1k" in name else 200, seed=len(name), max_size=96 * 1024)
    img = tmp_path / "xfs.img"
    mkxfs(img, options, files, how, tmp_path)
    free, block = free_space(img)
    expected = xfs_db_free(img)
    assert free.total > 0
    if "crc=0" in options:
        # v4: the free-list blocks (1-block extents the oracle lists) are not reported.
        agcount = db_field(img, "sb 0", "p agcount")
        flcount = sum(db_field(img, f"agf {ag}", "p flcount") for ag in range(agcount))
        missing = expected - free
        assert not free - expected and missing.total == flcount * block, missing
    else:
        assert free == expected, f"extra {free - expected!r}, missing {expected - free!r}"


def test_trees_have_several_levels_in_the_deep_layout(tmp_path: Path) -> None:
    """The 1 KiB-block layout really exercises node blocks (else the key checks are idle)."""
    options, how = LAYOUTS["v5-1k-deep-trees"]
    img = tmp_path / "xfs.img"
    mkxfs(img, options, make_files(700, 3, 64 * 1024), how, tmp_path)
    levels = run(["xfs_db", "-r", "-c", "agf 0", "-c", "p bnolevel cntlevel", str(img)])
    assert "bnolevel = 1" not in levels, levels


# -- refusals ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fragmented v5 and a v4 filesystem, built once (tests copy or restore them)."""
    tmp = tmp_path_factory.mktemp("xfs")
    out = {}
    for kind, options, how in (
        ("v5", ["-b", "size=1024", "-d", "agcount=2"], "mount"),
        ("v4", ["-m", "crc=0"], "proto"),
    ):
        img = tmp / f"{kind}.img"
        mkxfs(img, options, make_files(300, 5, 48 * 1024), how, tmp)
        out[kind] = img
    return out


def copy_of(src: Path, dest: Path) -> Path:
    run(["cp", "--sparse=always", str(src), str(dest)])
    return dest


def sparsify(capsys: pytest.CaptureFixture[str], img: Path) -> tuple[int, str]:
    code = main(["image", "sparsify", str(img), "--json"])
    return code, capsys.readouterr().err


def db_field(img: Path, *commands: str) -> int:
    out = run(["xfs_db", "-r", *[a for c in commands for a in ("-c", c)], str(img)])
    return int(out.strip().split(" = ")[-1], 0)


def test_dirty_log_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A copy taken while the kernel has the filesystem mounted and busy: its log does
    not end with an unmount record."""
    require_root()
    from vmreclaim.testing.linux import loop_mounted

    img = tmp_path / "xfs.img"
    mkxfs(img, [], make_files(20, 1, 32 * 1024), "mount", tmp_path)
    copy = tmp_path / "copy.img"
    with loop_mounted(img, tmp_path / "mnt") as (_dev, mnt):
        for i in range(50):
            (mnt / f"new{i}").write_bytes(b"x" * 10_000)
        subprocess.run(["sync"], check=True)
        run(["cp", "--sparse=always", str(img), str(copy)])
    before = copy.read_bytes()
    code, err = sparsify(capsys, copy)
    assert code == 4 and "log" in err and "recovery" in err, err
    assert copy.read_bytes() == before


@pytest.mark.parametrize("kind", ["v5", "v4"])
def test_agf_count_that_disagrees_is_refused(
    tmp_path: Path, pristine: dict[str, Path], capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    img = copy_of(pristine[kind], tmp_path / "xfs.img")
    freeblks = db_field(img, "agf 0", "p freeblks")
    # xfs_db -x writes the field and recomputes the AGF's CRC: only the cross-count can catch it.
    run(["xfs_db", "-x", "-c", "agf 0", "-c", f"write freeblks {freeblks + 8}", str(img)])
    code, err = sparsify(capsys, img)
    assert code == 4 and "AG 0" in err and "AGF counts" in err, err


def test_bnobt_record_edited_with_a_valid_crc_is_refused(
    tmp_path: Path, pristine: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A leaf record made longer (CRC recomputed by xfs_db): the cntbt no longer agrees."""
    img = copy_of(pristine["v5"], tmp_path / "xfs.img")
    levels = db_field(img, "agf 0", "p bnolevel")
    path = ["agf 0", "addr bnoroot"] + ["addr ptrs[1]"] * (levels - 1)
    count = db_field(img, *path, "p recs[1].blockcount")
    run(
        [
            "xfs_db",
            "-x",
            *[a for c in [*path, f"write recs[1].blockcount {count + 1}"] for a in ("-c", c)],
            str(img),
        ]
    )
    code, err = sparsify(capsys, img)
    assert code == 4 and "AG 0" in err, err


def test_bad_crc_is_refused(
    tmp_path: Path, pristine: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img = copy_of(pristine["v5"], tmp_path / "xfs.img")
    root = db_field(img, "agf 1", "p cntroot")
    agblocks = db_field(img, "sb 0", "p agblocks")
    with open(img, "r+b") as f:
        f.seek((agblocks + root) * 1024 + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    code, err = sparsify(capsys, img)
    assert code == 4 and "AG 1" in err and "CRC32C" in err, err


def test_needs_repair_and_external_log_are_refused(tmp_path: Path, pristine: dict[str, Path]) -> None:
    img = copy_of(pristine["v5"], tmp_path / "xfs.img")
    incompat = db_field(img, "sb 0", "p features_incompat")
    run(["xfs_db", "-x", "-c", "sb 0", "-c", f"write features_incompat {incompat | 0x10}", str(img)])
    with pytest.raises(VMReclaimError, match="needs xfs_repair"):
        free_space(img)
    img = copy_of(pristine["v5"], tmp_path / "xfs2.img")
    run(["xfs_db", "-x", "-c", "sb 0", "-c", "write -d logstart 0", str(img)])
    with pytest.raises(VMReclaimError, match="external device"):
        free_space(img)


# -- hostile metadata ---------------------------------------------------------------------

_TRUTH: dict[str, tuple[RangeSet, list[int]]] = {}


def _truth(img: Path) -> tuple[RangeSet, list[int]]:
    """The pristine image's free set, and the byte offsets of its superblock, AG headers
    and tree roots (where the damage is aimed)."""
    if str(img) not in _TRUTH:
        free, _ = free_space(img)
        block = db_field(img, "sb 0", "p blocksize")
        agblocks = db_field(img, "sb 0", "p agblocks")
        agcount = db_field(img, "sb 0", "p agcount")
        targets = [0]
        for ag in range(agcount):
            base = ag * agblocks * block
            targets += [base + 512, base + 1536]  # AGF, AGFL (512-byte sectors)
            for tree in ("bnoroot", "cntroot"):
                targets.append(base + db_field(img, f"agf {ag}", f"p {tree}") * block)
        _TRUTH[str(img)] = (free, targets)
    return _TRUTH[str(img)]


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["v5", "v4"]),
    flips=st.lists(
        st.tuples(st.integers(0, 100), st.integers(0, 1023), st.integers(1, 255)), min_size=1, max_size=3
    ),
)
def test_corrupted_metadata_never_frees_a_used_block(
    pristine: dict[str, Path], kind: str, flips: list[tuple[int, int, int]]
) -> None:
    """Bytes of the superblock, AGFs, AGFLs and tree roots change: the reader refuses,
    or its free set stays inside the true one (v4 has only the cross-counts to go on).
    The image is damaged in place and restored afterwards (the reader never writes)."""
    img = pristine[kind]
    truth, targets = _truth(img)
    saved = []
    with open(img, "r+b") as f:
        for which, offset, xor in flips:
            at = targets[which % len(targets)] + offset
            f.seek(at)
            old = f.read(1)[0]
            saved.append((at, old))
            f.seek(at)
            f.write(bytes([old ^ xor]))
    try:
        try:
            free, _ = free_space(img)
        except (VMReclaimError, AssertionError):
            return
        extra = free - truth
        assert not extra, f"{kind}: flips {flips} made {extra.total} used bytes look free"
    finally:
        with open(img, "r+b") as f:
            for at, old in reversed(saved):
                f.seek(at)
                f.write(bytes([old]))


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_sparsify_frees_deleted_files(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "disk.img"
    files = make_files(120, 9, 400 * 1024)
    survivors = mkxfs(img, [], files, "mount", tmp_path)
    expected, _ = free_space(img)
    disk = convert(img, fmt)
    before = allocated(disk)
    code = main(["image", "sparsify", str(disk), "--format", fmt, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert '"xfs"' in out.out
    deleted = sum(len(d) for n, d in files.items() if n not in survivors)
    freed = before - allocated(disk)
    assert freed >= 0.95 * deleted, f"freed {freed} of {deleted} deleted bytes"
    raw = to_raw(disk, fmt, tmp_path / "back.img")
    xfs_repair_clean(raw)
    assert free_space(raw)[0] == expected
    read_back(raw, survivors, tmp_path)


def test_copy_of_a_frozen_filesystem_is_refused(tmp_path: Path) -> None:
    """``xfs_freeze`` writes everything back but *covers* the log with a dummy record
    instead of an unmount record. Accepting a covered log is work for the live
    (freeze-and-read) mode; until then the reader refuses it like any dirty log."""
    require_root()
    require_tool("xfs_freeze")
    from vmreclaim.testing.linux import loop_mounted

    img = tmp_path / "xfs.img"
    mkxfs(img, [], make_files(20, 2, 64 * 1024), "mount", tmp_path)
    copy = tmp_path / "frozen.img"
    with loop_mounted(img, tmp_path / "mnt") as (_dev, mnt):
        run(["xfs_freeze", "-f", str(mnt)])
        try:
            run(["cp", "--sparse=always", str(img), str(copy)])
        finally:
            run(["xfs_freeze", "-u", str(mnt)])
    with pytest.raises(VMReclaimError, match="does not end with an unmount record"):
        free_space(copy)
