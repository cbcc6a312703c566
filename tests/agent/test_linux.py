"""The agent's kernel interfaces, checked against the kernel itself."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent.conftest import LoopFs, MiB, write_file
from vmreclaim.agent import ioctls, linux
from vmreclaim.core.ranges import RangeSet


def _iowr(kind: int, nr: int, size: int) -> int:
    # The asm-generic _IOWR, written out independently of vmreclaim.agent.ioctls.
    return 0xC0000000 | (size << 16) | (kind << 8) | nr


def test_ioctl_numbers_match_the_struct_sizes() -> None:
    assert linux.FSMAP_DTYPE.itemsize == 64
    assert linux.FIEMAP_EXTENT_DTYPE.itemsize == 56
    assert ioctls.FS_IOC_GETFSMAP == _iowr(ord("X"), 59, 64 * 3) == 0xC0C0583B
    assert ioctls.FITRIM == _iowr(ord("X"), 121, 24) == 0xC0185879
    assert ioctls.FIFREEZE == _iowr(ord("X"), 119, ctypes.sizeof(ctypes.c_int)) == 0xC0045877
    assert ioctls.FITHAW == 0xC0045878
    assert ioctls.FS_IOC_FIEMAP == _iowr(ord("f"), 11, 32) == 0xC020660B
    assert _iowr(0xFD, 12, 312) == ioctls.DM_TABLE_STATUS
    assert linux._DM_IOCTL.size == 312 and linux._DM_TARGET.size == 40


@pytest.mark.root
@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_getfsmap_keys_carry_the_device(loopfs: Callable[..., LoopFs], fstype: str) -> None:
    """With the filesystem's dev_t in the keys the kernel answers for the window only;
    with another device number it silently answers for the whole filesystem (docs/agent.md,
    "Verify") — which is why the agent always passes st_dev and clips what comes back."""
    fs = loopfs(fstype)
    fd = os.open(fs.mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dev = os.fstat(fd).st_dev
        whole = linux.free_space(fd, dev, 0, 2**62)
        lo, hi = 40 * MiB, 41 * MiB
        window = linux.free_space(fd, dev, lo, hi)
        assert window == whole.intersect(RangeSet.from_ranges([(lo, hi - lo)]))
        assert raw_free_records(fd, 0, lo, hi) > raw_free_records(fd, dev, lo, hi)
        if fstype == "ext4":  # XFS keeps reserved pools that statfs counts as used
            vfs = os.fstatvfs(fd)
            assert whole.total == vfs.f_bfree * vfs.f_frsize
    finally:
        os.close(fd)


def raw_free_records(fd: int, device: int, lo: int, hi: int) -> int:
    """How many free-space records one GETFSMAP call returns for keys with ``device``."""
    buf = bytearray(192 + 1024 * 64)
    struct.pack_into("=IIII", buf, 0, 0, 0, 1024, 0)
    struct.pack_into("=IIQQQQ24x", buf, 64, device, 0, lo, 0, 0, 0)
    struct.pack_into("=IIQQQQ24x", buf, 128, device or 0xFFFFFFFF, 0xFFFFFFFF, hi, 2**64 - 1, 2**64 - 1, 0)
    fcntl.ioctl(fd, ioctls.FS_IOC_GETFSMAP, buf, True)
    count = struct.unpack_from("=I", buf, 12)[0]
    return sum(
        1 for i in range(count) if struct.unpack_from("=IIQQ", buf, 192 + 64 * i)[3] == linux.FMR_OWN_FREE
    )


def test_getfsmap_unsupported_is_a_reason_not_an_error() -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(OSError) as raised:
                linux.free_space(fd, os.fstat(fd).st_dev, 0, 4096)
            assert raised.value.errno in (errno.ENOTTY, errno.EOPNOTSUPP)
            assert linux.fsmap_missing(fd, os.fstat(fd).st_dev) == os.strerror(raised.value.errno)
        finally:
            os.close(fd)


@pytest.mark.root
def test_fiemap_and_fitrim(loopfs: Callable[..., LoopFs]) -> None:
    fs = loopfs("ext4")
    f = write_file(fs.mount / "f", 3 * MiB + 100)
    fd = os.open(f, os.O_RDONLY)
    try:
        ext = linux.fiemap(fd)
    finally:
        os.close(fd)
    bs = os.statvfs(fs.mount).f_bsize  # 1 KiB on a small ext4: never assume 4 KiB
    assert ext.ranges.total == 3 * MiB + bs  # whole blocks
    assert not ext.shared and not ext.unmapped
    free = fs.free()
    assert not free.intersect(ext.ranges)
    # A sparse file: the hole has no extent; an unwritten (fallocated) extent counts.
    sparse = fs.mount / "sparse"
    with open(sparse, "wb") as fh:
        fh.seek(8 * MiB)
        fh.write(b"x")
        os.posix_fallocate(fh.fileno(), 0, 1 * MiB)
        fh.flush()
        ext2 = linux.fiemap(fh.fileno())
    assert ext2.ranges.total == 1 * MiB + bs
    mfd = os.open(fs.mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert linux.fitrim(mfd, 0, 2**64 - 1, 0) > 0
        with pytest.raises(OSError) as exc:
            linux.fitrim(mfd, 0, 100, 0)  # shorter than a block
        assert exc.value.errno == errno.EINVAL
        linux.freeze(mfd)
        try:
            with pytest.raises(OSError) as exc:
                linux.freeze(mfd)
            assert exc.value.errno == errno.EBUSY
        finally:
            linux.thaw(mfd)
        with pytest.raises(OSError) as exc:
            linux.thaw(mfd)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(mfd)


def test_dm_table_without_device_mapper_is_an_oserror() -> None:
    if Path("/dev/mapper/control").exists():
        try:
            with open("/dev/mapper/control", "rb"):
                pytest.skip("device-mapper works here: covered by the sysfs copies in test_devices")
        except OSError:
            pass
    with pytest.raises(OSError):
        linux.dm_table("no-such-device")


def test_file_handle_inodes() -> None:
    assert linux.handle_inode(1, struct.pack("=II", 12, 7)) == 12
    assert linux.handle_inode(0x81, struct.pack("=QI", 2**40 + 3, 1)) == 2**40 + 3
    assert linux.handle_inode(0x4D, b"\0" * 8) is None
