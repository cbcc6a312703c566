"""Linux interfaces the agent needs, from the standard library only (fcntl, ctypes).

The agent must install in a guest with nothing but Python and pip, so there is no
binding package here: each ioctl is a struct layout from the kernel's uapi headers
(``fs.h``, ``fsmap.h``, ``fiemap.h``, ``dm-ioctl.h``) and a number computed for the
asm-generic ioctl encoding (x86_64, arm64, riscv64, s390x). Numbers and layouts are
checked against the kernel by ``tests/agent/test_linux.py``.

Every failure is an ``OSError`` with the errno of the kernel; callers map them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmreclaim.agent.ioctls import DM_TABLE_STATUS, FIFREEZE, FITHAW, FITRIM, FS_IOC_FIEMAP, FS_IOC_GETFSMAP
from vmreclaim.core.ranges import RangeSet

# -- libc ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syncfs.restype = ctypes.c_int
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_init1.restype = ctypes.c_int
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_add_watch.restype = ctypes.c_int
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.open_by_handle_at.restype = ctypes.c_int


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def syncfs(fd: int) -> None:
    """Commit everything of the filesystem holding ``fd`` (journal included)."""
    _check(_libc.syncfs(fd), "syncfs")


# -- GETFSMAP -------------------------------------------------------------------------------

FMH_OF_DEV_T = 0x1
FMR_OF_SPECIAL_OWNER = 0x10
FMR_OF_LAST = 0x20
FMR_OWN_FREE = 0x1

#: ``struct fsmap`` (64 bytes), native byte order.
FSMAP_DTYPE = np.dtype(
    [
        ("device", "=u4"),
        ("flags", "=u4"),
        ("physical", "=u8"),
        ("owner", "=u8"),
        ("offset", "=u8"),
        ("length", "=u8"),
        ("reserved", "V24"),
    ]
)
_FSMAP_HEAD = 64  # fmh_iflags .. fmh_reserved, then the two keys (64 bytes each)
_FSMAP_RECS = 192
_FSMAP_KEY = struct.Struct("=IIQQQQ24x")
#: Records fetched per GETFSMAP call (64 KiB of buffer).
FSMAP_BATCH = 1024
#: Records per call for a whole filesystem (reconciliation; 8 MiB of buffer): ext4 redoes
#: its per-call setup (every group's fixed metadata) on each call, so on a fragmented
#: 1 TiB filesystem 1024 records a call cost 7x the time of 131,072.
FSMAP_WHOLE_BATCH = 131072
_U64 = 2**64 - 1


def fsmap_missing(fd: int, device: int) -> str | None:
    """Why the filesystem open as ``fd`` cannot answer GETFSMAP for ``device`` (the
    ``strerror`` of ENOTTY or EOPNOTSUPP), or ``None`` when it can.

    Raises ``OSError`` for any other failure (the filesystem should answer and did not).
    """
    try:
        free_space(fd, device, 0, 1)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
            return os.strerror(exc.errno)
        raise
    return None


def free_space(fd: int, device: int, start: int, end: int, *, batch: int = FSMAP_BATCH) -> RangeSet:
    """Free byte ranges of the filesystem's data device within ``[start, end)``.

    ``device`` is the data device's ``dev_t`` (``os.fstat(fd).st_dev``). Both keys must
    carry it: ext4 and XFS ignore the physical bounds of a key whose device is not
    theirs and answer for the whole filesystem. Only records owned by ``FMR_OWN_FREE``
    on that device are kept, clipped to the window (records may straddle it).
    """
    if end <= start:
        return RangeSet()
    buf = bytearray(_FSMAP_RECS + batch * FSMAP_DTYPE.itemsize)
    struct.pack_into("=IIII", buf, 0, 0, 0, batch, 0)
    _FSMAP_KEY.pack_into(buf, _FSMAP_HEAD, device, 0, start, 0, 0, 0)
    _FSMAP_KEY.pack_into(buf, _FSMAP_HEAD + 64, device, 0xFFFFFFFF, end, _U64, _U64, 0)
    starts: list[npt.NDArray[np.uint64]] = []
    lengths: list[npt.NDArray[np.uint64]] = []
    while True:
        try:
            fcntl.ioctl(fd, FS_IOC_GETFSMAP, buf, True)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
                raise OSError(exc.errno, "GETFSMAP is not supported here") from exc
            raise
        oflags, _count, entries = struct.unpack_from("=III", buf, 4)
        if not oflags & FMH_OF_DEV_T:
            # Answers that cannot be tied to the device we translate are no answers.
            raise OSError(errno.EOPNOTSUPP, "GETFSMAP answers without device numbers (FMH_OF_DEV_T)")
        if entries == 0:
            break
        recs = np.frombuffer(buf, dtype=FSMAP_DTYPE, count=entries, offset=_FSMAP_RECS)
        free = (
            ((recs["flags"] & FMR_OF_SPECIAL_OWNER) != 0)
            & (recs["owner"] == FMR_OWN_FREE)
            & (recs["device"] == device)
        )
        starts.append(recs["physical"][free].copy())
        lengths.append(recs["length"][free].copy())
        if int(recs["flags"][-1]) & FMR_OF_LAST:
            break
        # The kernel resumes after the key's physical + length (fsmap_advance).
        last = _FSMAP_RECS + (entries - 1) * FSMAP_DTYPE.itemsize
        buf[_FSMAP_HEAD : _FSMAP_HEAD + 64] = buf[last : last + 64]
    if not starts:
        return RangeSet()
    s = np.concatenate(starts).astype(np.int64)
    e = s + np.concatenate(lengths).astype(np.int64)
    return RangeSet(np.maximum(s, start), np.minimum(e, end))


# -- FIEMAP ---------------------------------------------------------------------------------

FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
#: Extents whose physical location is not a plain run of the device's blocks.
FIEMAP_EXTENT_NOT_PLAIN = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
FIEMAP_EXTENT_SHARED = 0x2000

FIEMAP_EXTENT_DTYPE = np.dtype(
    [
        ("logical", "=u8"),
        ("physical", "=u8"),
        ("length", "=u8"),
        ("reserved64", "V16"),
        ("flags", "=u4"),
        ("reserved", "V12"),
    ]
)
_FIEMAP = struct.Struct("=QQIII4x")
FIEMAP_BATCH = 256


@dataclass(frozen=True)
class Extents:
    """FIEMAP of one file: physical device byte ranges of its plain, unshared extents,
    and whether it had extents that cannot be attributed (delalloc, inline, shared)."""

    ranges: RangeSet
    shared: RangeSet
    unmapped: bool


def fiemap(fd: int, *, sync: bool = True) -> Extents:
    """The extents of the open file ``fd`` (``FIEMAP_FLAG_SYNC`` flushes it first)."""
    buf = bytearray(_FIEMAP.size + FIEMAP_BATCH * FIEMAP_EXTENT_DTYPE.itemsize)
    logical = 0
    plain_s: list[npt.NDArray[np.uint64]] = []
    plain_n: list[npt.NDArray[np.uint64]] = []
    shared_s: list[npt.NDArray[np.uint64]] = []
    shared_n: list[npt.NDArray[np.uint64]] = []
    unmapped = False
    while True:
        _FIEMAP.pack_into(buf, 0, logical, _U64 - logical, FIEMAP_FLAG_SYNC if sync else 0, 0, FIEMAP_BATCH)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = struct.unpack_from("=I", buf, 20)[0]
        if mapped == 0:
            break
        ext = np.frombuffer(buf, dtype=FIEMAP_EXTENT_DTYPE, count=mapped, offset=_FIEMAP.size)
        flags = ext["flags"]
        plain = (flags & (FIEMAP_EXTENT_NOT_PLAIN | FIEMAP_EXTENT_SHARED)) == 0
        is_shared = ((flags & FIEMAP_EXTENT_SHARED) != 0) & ((flags & FIEMAP_EXTENT_NOT_PLAIN) == 0)
        unmapped = unmapped or bool(((flags & FIEMAP_EXTENT_NOT_PLAIN) != 0).any())
        plain_s.append(ext["physical"][plain].copy())
        plain_n.append(ext["length"][plain].copy())
        shared_s.append(ext["physical"][is_shared].copy())
        shared_n.append(ext["length"][is_shared].copy())
        if int(flags[-1]) & FIEMAP_EXTENT_LAST:
            break
        logical = int(ext["logical"][-1]) + int(ext["length"][-1])
    return Extents(_ranges(plain_s, plain_n), _ranges(shared_s, shared_n), unmapped)


def _ranges(starts: list[npt.NDArray[np.uint64]], lengths: list[npt.NDArray[np.uint64]]) -> RangeSet:
    if not starts:
        return RangeSet()
    s = np.concatenate(starts).astype(np.int64)
    return RangeSet(s, s + np.concatenate(lengths).astype(np.int64))


# -- FITRIM, FIFREEZE, FITHAW ---------------------------------------------------------------

_FSTRIM = struct.Struct("=QQQ")


def fitrim(fd: int, start: int, length: int, minlen: int = 0) -> int:
    """Discard the free blocks of ``[start, start + length)``; the kernel's answer
    (ext4: bytes discarded; XFS ≥ 6.8: the asked length clipped to the filesystem)."""
    buf = bytearray(_FSTRIM.pack(start, length, minlen))
    fcntl.ioctl(fd, FITRIM, buf, True)
    return int(_FSTRIM.unpack(buf)[1])


def freeze(fd: int) -> None:
    """FIFREEZE: flush and block every writer of the filesystem holding ``fd``."""
    fcntl.ioctl(fd, FIFREEZE, 0)


def thaw(fd: int) -> None:
    """FITHAW: let writers of the filesystem go on."""
    fcntl.ioctl(fd, FITHAW, 0)


# -- device-mapper table ------------------------------------------------------------------

_DM_IOCTL = struct.Struct("=3IIIIiIII Q128s129s7x")
_DM_TARGET = struct.Struct("=QQiI16s")
_DM_STATUS_TABLE_FLAG = 1 << 4
_DM_BUFFER_FULL_FLAG = 1 << 8


@dataclass(frozen=True)
class DmTarget:
    """One line of a device-mapper table, in 512-byte sectors as the kernel gives it."""

    start: int
    length: int
    type: str
    params: str


def dm_table(name: str) -> list[DmTarget]:
    """The live table of device-mapper device ``name`` (DM_TABLE_STATUS, as ``dmsetup table``)."""
    size = 16384
    fd = os.open("/dev/mapper/control", os.O_RDWR | os.O_CLOEXEC)
    try:
        while True:
            buf = bytearray(size)
            _DM_IOCTL.pack_into(
                buf,
                0,
                4,
                0,
                0,
                size,
                _DM_IOCTL.size,
                0,
                0,
                _DM_STATUS_TABLE_FLAG,
                0,
                0,
                0,
                name.encode()[:127],
                b"",
            )
            fcntl.ioctl(fd, DM_TABLE_STATUS, buf, True)
            fields = _DM_IOCTL.unpack_from(buf, 0)
            data_start, count, flags = fields[4], fields[5], fields[7]
            if flags & _DM_BUFFER_FULL_FLAG:
                size *= 4
                if size > 16 * 1024 * 1024:
                    raise OSError(75, f"device-mapper table of {name} does not fit in 16 MiB")
                continue
            break
    finally:
        os.close(fd)
    targets = []
    where = data_start
    for _ in range(count):
        start, length, _status, nxt, ttype = _DM_TARGET.unpack_from(buf, where)
        params_at = where + _DM_TARGET.size
        end = buf.index(0, params_at)
        targets.append(
            DmTarget(
                start, length, ttype.rstrip(b"\0").decode(), buf[params_at:end].decode("ascii", "replace")
            )
        )
        where = data_start + nxt
    return targets


# -- fanotify, inotify, file handles ----------------------------------------------------------

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_TARGET_FID = 0x1000
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_REPORT_DFID_NAME_TARGET = FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID
FAN_MARK_ADD = 0x1
FAN_MARK_FILESYSTEM = 0x100
FAN_MODIFY = 0x2
FAN_CLOSE_WRITE = 0x8
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_Q_OVERFLOW = 0x4000
FAN_ONDIR = 0x40000000

FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3


def fanotify_init(flags: int, event_f_flags: int = os.O_RDONLY) -> int:
    return _check(_libc.fanotify_init(flags, event_f_flags), "fanotify_init")


def fanotify_mark(fd: int, flags: int, mask: int, path: str) -> None:
    _check(_libc.fanotify_mark(fd, flags, mask, -100, os.fsencode(path)), f"fanotify_mark {path}")


IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000


def inotify_init() -> int:
    return _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")


def inotify_add_watch(fd: int, path: str | bytes, mask: int) -> int:
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), mask), f"inotify_add_watch {path!r}")


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """``open_by_handle_at`` (needs CAP_DAC_READ_SEARCH): a descriptor of the object."""
    raw = struct.pack("=Ii", len(handle), handle_type) + handle
    buf = ctypes.create_string_buffer(raw, len(raw))
    return _check(
        _libc.open_by_handle_at(mount_fd, ctypes.addressof(buf), flags | os.O_CLOEXEC), "open_by_handle_at"
    )


def handle_inode(handle_type: int, handle: bytes) -> int | None:
    """The inode number inside an ext4/XFS file handle, when its layout is known."""
    if handle_type == 1 and len(handle) >= 8:  # FILEID_INO32_GEN: u32 ino, u32 gen
        return int(struct.unpack_from("=I", handle)[0])
    if handle_type == 0x81 and len(handle) >= 12:  # XFS 64-bit: u64 ino, u32 gen
        return int(struct.unpack_from("=Q", handle)[0])
    return None
