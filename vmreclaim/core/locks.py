"""Busy-image detection with QEMU's own lock protocol.

QEMU (``block/file-posix.c``) takes open-file-description (OFD) read locks on single
bytes of every image it opens: byte ``100 + i`` for each permission ``i`` it holds and
byte ``200 + i`` for each permission it refuses to share with others. Permission 0 is
"consistent read", 1 is "write". A running VM holds 100, 101, 103, 201 and 203;
``qemu-io`` holds 100 and 101. The locks are advisory: ``fallocate`` ignores them, so
an offline writer must look before it writes.

:func:`hold_for_writing` does what a QEMU writer does: it takes the locks of a writer
that refuses other writers (100, 101, 201) and then asks the kernel whether anyone else
holds a lock that conflicts. Setting first and testing second closes the race with a
QEMU that starts meanwhile: whichever comes second sees the other.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmreclaim.core.errors import ImageBusyError, UsageError

F_OFD_GETLK = 36
F_OFD_SETLK = 37

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1

# struct flock on x86_64 / aarch64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid, and padding to 32 bytes.
_FLOCK = struct.Struct("@hhqqi4x")

#: The bytes a writer that refuses other writers holds.
_WRITER_BYTES = (
    LOCK_PERM_BASE + PERM_CONSISTENT_READ,
    LOCK_PERM_BASE + PERM_WRITE,
    LOCK_SHARED_BASE + PERM_WRITE,
)
#: Others' locks that forbid us to write: they write, or they refuse to share writing
#: or consistent reading.
_CONFLICTS = {
    LOCK_PERM_BASE + PERM_WRITE: "holds it open for writing",
    LOCK_SHARED_BASE + PERM_WRITE: "refuses to share it with a writer",
    LOCK_SHARED_BASE + PERM_CONSISTENT_READ: "refuses to share it with a reader",
}


def _lock_byte(fd: int, offset: int, lock_type: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0))


def _held_by_other(fd: int, offset: int) -> bool:
    """True if another open file description holds any lock on byte ``offset``."""
    probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    lock_type = _FLOCK.unpack(fcntl.fcntl(fd, F_OFD_GETLK, probe))[0]
    return bool(lock_type != fcntl.F_UNLCK)


def busy_reason(fd: int) -> str | None:
    """Why another process forbids writing the file open as ``fd``, or ``None``."""
    for offset, reason in _CONFLICTS.items():
        if _held_by_other(fd, offset):
            return reason
    return None


@contextmanager
def hold_for_writing(path: str | os.PathLike[str]) -> Iterator[int]:
    """Open ``path`` read-write, locked like a QEMU writer; raise if anyone else uses it.

    Yields the writable file descriptor; the locks go with it when the block ends.
    Raises :class:`ImageBusyError` (exit 3) without writing anything when another
    process holds a conflicting QEMU lock.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError as exc:
        raise UsageError(f"{path}: cannot open for writing: {exc.strerror}") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        try:
            for offset in _WRITER_BYTES:
                _lock_byte(fd, offset, fcntl.F_RDLCK)
        except OSError as exc:
            # A conflicting write lock on one of our bytes: someone locked it exclusively.
            raise ImageBusyError(f"{path}: image is busy: cannot take its lock ({exc.strerror})") from exc
        reason = busy_reason(fd)
        if reason is not None:
            raise ImageBusyError(
                f"{path}: image is busy: another process (a running QEMU, qemu-io or "
                f"qemu-storage-daemon) {reason}; stop it first"
            )
        yield fd
    finally:
        os.close(fd)
