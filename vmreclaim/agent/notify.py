"""Event sources: fanotify with a filesystem mark, else inotify over the tree.

Both are non-blocking descriptors the agent's event loop watches; :meth:`read` drains
what is queued and returns :class:`~vmreclaim.core.captures.FsEvent` objects. Events
are triggers (docs/agent.md, "Capture"): nothing here is trusted to say which blocks are free.

* **fanotify** (``FAN_MARK_FILESYSTEM``, needs ``CAP_SYS_ADMIN``): one mark sees the
  whole filesystem, including directories created later. Directory-entry events need a
  group that reports file ids: ``FAN_REPORT_DFID_NAME_TARGET`` (Linux 5.17: parent,
  name *and* the deleted inode) when paths are wanted, else the cheapest that works.
  When the driver does not need paths the events are not parsed beyond their masks.
* **inotify**: one watch per directory, added as directories appear; bounded by
  ``fs.inotify.max_user_watches`` (past it, the periodic scan is the backstop).

Closing a file opened for writing is ``WRITTEN``; every ``write(2)`` and truncate is
``MODIFIED``, which drivers only note (a process appending to a file all day must not
cost a FIEMAP per write), and which wakes the agent at most once per debounce.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from vmreclaim.agent import linux
from vmreclaim.core.captures import FsEvent, FsEventKind

log = logging.getLogger("vmreclaim.agent")

#: Bytes read from an event descriptor per call; a drain stops after ``MAX_DRAIN``.
READ_SIZE = 64 * 1024
MAX_DRAIN = 64 * READ_SIZE
#: Events kept from one drain; more collapse into one ``OVERFLOW`` (look at everything).
MAX_EVENTS = 100_000


class EventSource(Protocol):
    """What the agent needs from an event source."""

    kind: str

    def fileno(self) -> int: ...

    def read(self) -> list[FsEvent]: ...

    def close(self) -> None: ...


_FAN_META = struct.Struct("=IBBHQii")
_FAN_INFO = struct.Struct("=BBH")
_FAN_FID = struct.Struct("=8sIi")  # fsid, handle_bytes, handle_type

_FAN_MASK = (
    linux.FAN_DELETE
    | linux.FAN_MOVED_FROM
    | linux.FAN_MOVED_TO
    | linux.FAN_CLOSE_WRITE
    | linux.FAN_MODIFY
    | linux.FAN_ONDIR
)


def _kinds(mask: int) -> list[FsEventKind]:
    out = []
    if mask & linux.FAN_Q_OVERFLOW:
        out.append(FsEventKind.OVERFLOW)
    if mask & (linux.FAN_DELETE | linux.FAN_DELETE_SELF):
        out.append(FsEventKind.DELETED)
    if mask & (linux.FAN_MOVED_FROM | linux.FAN_MOVED_TO):
        out.append(FsEventKind.MOVED)
    if mask & linux.FAN_CLOSE_WRITE:
        out.append(FsEventKind.WRITTEN)
    elif mask & linux.FAN_MODIFY:
        out.append(FsEventKind.MODIFIED)
    return out


class FanotifySource:
    """A fanotify group with a filesystem mark on ``mount``."""

    kind = "fanotify"

    def __init__(self, mount: Path, *, want_paths: bool) -> None:
        self.mount = mount
        self.want_paths = want_paths
        # Richest reporting first; older kernels refuse the flags they do not know.
        choices = (
            [linux.FAN_REPORT_DFID_NAME_TARGET, linux.FAN_REPORT_DFID_NAME]
            if want_paths
            else [linux.FAN_REPORT_FID, linux.FAN_REPORT_DFID_NAME]
        )
        last: OSError | None = None
        self.fd = -1
        for report in choices:
            try:
                fd = linux.fanotify_init(
                    linux.FAN_CLASS_NOTIF | linux.FAN_CLOEXEC | linux.FAN_NONBLOCK | report
                )
            except OSError as exc:
                last = exc
                continue
            try:
                linux.fanotify_mark(fd, linux.FAN_MARK_ADD | linux.FAN_MARK_FILESYSTEM, _FAN_MASK, str(mount))
            except OSError as exc:
                os.close(fd)
                last = exc
                continue
            self.fd = fd
            self.report = report
            break
        if self.fd < 0:
            assert last is not None
            raise last
        self.mount_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if want_paths else -1
        self._dirs: OrderedDict[bytes, Path | None] = OrderedDict()

    def fileno(self) -> int:
        return self.fd

    def read(self) -> list[FsEvent]:
        if not self.want_paths:
            mask = 0
            for data in _drain(self.fd):
                mask |= _masks(data)
            return [FsEvent(k) for k in _kinds(mask)]
        return _bounded([e for data in _drain(self.fd) for e in self._parse(data)])

    def _parse(self, data: bytes) -> list[FsEvent]:
        out = []
        off = 0
        while off + _FAN_META.size <= len(data):
            event_len, _vers, _res, meta_len, mask, _fd, _pid = _FAN_META.unpack_from(data, off)
            if event_len < _FAN_META.size:
                break
            path: Path | None = None
            inode: int | None = None
            info = off + meta_len
            end = off + event_len
            while info + _FAN_INFO.size <= end:
                info_type, _pad, info_len = _FAN_INFO.unpack_from(data, info)
                if info_len < _FAN_INFO.size:
                    break
                body = info + _FAN_INFO.size
                if info_type in (linux.FAN_EVENT_INFO_TYPE_FID, linux.FAN_EVENT_INFO_TYPE_DFID_NAME):
                    _fsid, hbytes, htype = _FAN_FID.unpack_from(data, body)
                    hstart = body + _FAN_FID.size
                    handle = bytes(data[hstart : hstart + hbytes])
                    if info_type == linux.FAN_EVENT_INFO_TYPE_FID:
                        inode = linux.handle_inode(htype, handle)
                    else:
                        name_end = data.index(b"\0", hstart + hbytes, info + info_len)
                        name = os.fsdecode(data[hstart + hbytes : name_end])
                        parent = self._dir_path(htype, handle)
                        if parent is not None and name not in (".", ""):
                            path = parent / name
                info += info_len
            for kind in _kinds(mask):
                out.append(FsEvent(kind, path=path, inode=inode, is_dir=bool(mask & linux.FAN_ONDIR)))
            if mask & linux.FAN_ONDIR and mask & (linux.FAN_MOVED_FROM | linux.FAN_MOVED_TO):
                self._dirs.clear()  # cached directory paths may be stale now
            off += event_len
        return out

    def _dir_path(self, handle_type: int, handle: bytes) -> Path | None:
        """The path of a directory from its file handle (cached, bounded)."""
        key = struct.pack("=i", handle_type) + handle
        if key in self._dirs:
            self._dirs.move_to_end(key)
            return self._dirs[key]
        path: Path | None
        try:
            fd = linux.open_by_handle(self.mount_fd, handle_type, handle)
        except OSError:
            path = None
        else:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                path = None if target.endswith(" (deleted)") else Path(target)
            except OSError:
                path = None
            finally:
                os.close(fd)
        self._dirs[key] = path
        if len(self._dirs) > 4096:
            self._dirs.popitem(last=False)
        return path

    def close(self) -> None:
        for fd in (self.fd, self.mount_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.mount_fd = -1


def _drain(fd: int) -> Iterator[bytes]:
    """What is queued on a non-blocking event descriptor, at most MAX_DRAIN bytes."""
    total = 0
    while total < MAX_DRAIN:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            return
        total += len(data)
        yield data


def _bounded(events: list[FsEvent]) -> list[FsEvent]:
    """Too many events to be worth looking at one by one: look at everything instead."""
    return [FsEvent(FsEventKind.OVERFLOW)] if len(events) > MAX_EVENTS else events


def _masks(data: bytes) -> int:
    """The union of the event masks in a buffer, without decoding the events."""
    mask = 0
    off = 0
    n = len(data)
    unpack = _FAN_META.unpack_from
    while off + 24 <= n:
        event_len, _v, _r, _m, m, _fd, _pid = unpack(data, off)
        if event_len < 24:
            break
        mask |= m
        off += event_len
    return mask


_IN_EVENT = struct.Struct("=iIII")
_IN_MASK = (
    linux.IN_DELETE
    | linux.IN_CLOSE_WRITE
    | linux.IN_MODIFY
    | linux.IN_MOVED_FROM
    | linux.IN_MOVED_TO
    | linux.IN_CREATE
    | linux.IN_DELETE_SELF
    | linux.IN_ONLYDIR
    | linux.IN_DONT_FOLLOW
)


class InotifySource:
    """inotify watches on every directory of the filesystem under ``mount``."""

    kind = "inotify"

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.dev = os.stat(mount).st_dev
        self.fd = linux.inotify_init()
        self.dirs: dict[int, Path] = {}
        self.limited = False
        self._watch_tree(mount)

    def fileno(self) -> int:
        return self.fd

    def _watch_tree(self, top: Path) -> None:
        stack = [top]
        while stack and not self.limited:
            here = stack.pop()
            if not self._watch(here):
                continue
            try:
                with os.scandir(here) as it:
                    for entry in it:
                        try:
                            if (
                                entry.is_dir(follow_symlinks=False)
                                and entry.stat(follow_symlinks=False).st_dev == self.dev
                            ):
                                stack.append(Path(entry.path))
                        except OSError:
                            continue
            except OSError:
                continue

    def _watch(self, path: Path) -> bool:
        try:
            wd = linux.inotify_add_watch(self.fd, str(path), _IN_MASK)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.limited = True
                log.warning(
                    "%s: inotify watch limit reached (fs.inotify.max_user_watches); directories "
                    "beyond it rely on the periodic scan",
                    self.mount,
                )
            return False
        self.dirs[wd] = path
        return True

    def read(self) -> list[FsEvent]:
        return _bounded([e for data in _drain(self.fd) for e in self._parse(data)])

    def _parse(self, data: bytes) -> list[FsEvent]:
        out = []
        off = 0
        while off + _IN_EVENT.size <= len(data):
            wd, mask, _cookie, nlen = _IN_EVENT.unpack_from(data, off)
            raw = data[off + _IN_EVENT.size : off + _IN_EVENT.size + nlen].split(b"\0", 1)[0]
            off += _IN_EVENT.size + nlen
            if mask & linux.IN_Q_OVERFLOW:
                out.append(FsEvent(FsEventKind.OVERFLOW))
                self._watch_tree(self.mount)  # directories created meanwhile
                continue
            if mask & linux.IN_IGNORED:
                self.dirs.pop(wd, None)
                continue
            parent = self.dirs.get(wd)
            if parent is None:
                continue
            path = parent / os.fsdecode(raw) if raw else parent
            is_dir = bool(mask & linux.IN_ISDIR)
            if is_dir and mask & (linux.IN_CREATE | linux.IN_MOVED_TO):
                self._watch_tree(path)
            if mask & linux.IN_DELETE:
                out.append(FsEvent(FsEventKind.DELETED, path=path, is_dir=is_dir))
            if mask & (linux.IN_MOVED_FROM | linux.IN_MOVED_TO):
                out.append(FsEvent(FsEventKind.MOVED, path=path, is_dir=is_dir))
            if mask & linux.IN_CLOSE_WRITE and not is_dir:
                out.append(FsEvent(FsEventKind.WRITTEN, path=path))
            elif mask & linux.IN_MODIFY and not is_dir:
                out.append(FsEvent(FsEventKind.MODIFIED, path=path))
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_source(mount: Path, choice: str, *, want_paths: bool) -> tuple[EventSource | None, str]:
    """The event source for ``mount`` per the capture's ``events`` option, and a
    sentence for the start-up log saying which one and why."""
    if choice == "none":
        return None, "no event source (events: none): periodic scan only"
    if choice in ("auto", "fanotify"):
        try:
            src = FanotifySource(mount, want_paths=want_paths)
            return src, f"fanotify filesystem mark (report flags {src.report:#x})"
        except OSError as exc:
            if choice == "fanotify":
                raise
            reason = f"fanotify unavailable ({exc.strerror or exc})"
    else:
        reason = "inotify asked for"
    isrc = InotifySource(mount)
    return isrc, f"inotify on {len(isrc.dirs)} directories; {reason}"
