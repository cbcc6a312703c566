"""The mounted filesystems the agent watches (not the "filesystems" plugin kind, which
reads filesystems inside images offline): where they are, what they can do, and verify.

A :class:`WatchedFs` is one configured mount: its device, the map from device bytes to
the virtual disk (:mod:`vmreclaim.agent.devices`), the disk identity it reports, and a
descriptor of the mount kept open for GETFSMAP, syncfs, FIFREEZE and FITRIM. It is the
:class:`~vmreclaim.core.captures.CaptureTarget` handed to capture drivers.

:func:`verify` is stage 2 of the pipeline (DESIGN.md section 4, rule 1)::

    statfs   XFS frees unlinked inodes in the background (inodegc); statfs flushes that
             queue, syncfs does not, so without it a fresh delete may not look free yet
    syncfs   commit the deletes (ext4 only shows blocks free once jbd2 has committed)
    GETFSMAP free ranges of the device, keyed by its dev_t, inside the candidates' bounds
    syncfs   commit whatever was observed: an in-memory free state (XFS's bnobt before the
             log is forced) is then on disk, so a crash cannot roll it back
    hooks    vmreclaim_verify_filter may only narrow

Under a fence the filesystem is frozen, which has committed everything: no syncfs.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmreclaim.agent import linux
from vmreclaim.agent.devices import DiskMap, Topology, _TopologyError, find_mount
from vmreclaim.core.captures import FileExtents
from vmreclaim.core.config import FilesystemEntry
from vmreclaim.core.errors import AgentSetupError
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.ranges import ByteRange, RangeSet

log = logging.getLogger("vmreclaim.agent")

VerifyMode = Literal["getfsmap", "fitrim-only"]


class WatchedFs:
    """One configured filesystem, open for the agent's ioctls."""

    def __init__(self, entry: FilesystemEntry, topology: Topology | None = None) -> None:
        self.entry = entry
        self._mount = Path(os.path.realpath(entry.mount))
        try:
            self.fd = os.open(self._mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise AgentSetupError(f"filesystem {entry.mount}: cannot open it: {exc.strerror}") from exc
        try:
            self._setup(topology or Topology())
        except BaseException:
            os.close(self.fd)
            raise

    def _setup(self, topology: Topology) -> None:
        entry = self.entry
        try:
            info = find_mount(self._mount)
        except (OSError, _TopologyError) as exc:
            raise AgentSetupError(f"filesystem {entry.mount}: {exc}") from exc
        if info.mount != self._mount:
            raise AgentSetupError(f"filesystem {entry.mount}: not a mount point (it lies on {info.mount})")
        self.dev = os.fstat(self.fd).st_dev
        self._fstype = info.fstype
        self.diskmap: DiskMap | None = None
        self.problem: str | None = None
        self.mode: VerifyMode = "getfsmap"
        try:
            missing = linux.fsmap_missing(self.fd, self.dev)
        except OSError as exc:
            raise AgentSetupError(
                f"filesystem {entry.mount}: GETFSMAP failed: {exc.strerror or exc}"
            ) from exc
        if missing is not None:
            self.mode = "fitrim-only"
            self.problem = f"{self._fstype} has no GETFSMAP ({missing})"
        try:
            self.diskmap = topology.map_device(self.dev)
        except _TopologyError as exc:
            self.mode = "fitrim-only"
            self.problem = self.problem or str(exc)
        if entry.disk is not None:
            self.disk_id = entry.disk
        elif self.diskmap is not None and self.diskmap.disk.serial:
            self.disk_id = self.diskmap.disk.serial
        else:
            where = self.diskmap.disk.name if self.diskmap is not None else "its disk"
            raise AgentSetupError(
                f"filesystem {entry.mount}: {where} has no serial number; name the disk in the "
                "configuration (filesystems: - {mount: ..., disk: NAME})"
            )

    # -- CaptureTarget --------------------------------------------------------------------

    @property
    def mount(self) -> Path:
        return self._mount

    @property
    def device(self) -> str:
        return (
            self.diskmap.device if self.diskmap is not None else f"{os.major(self.dev)}:{os.minor(self.dev)}"
        )

    @property
    def fstype(self) -> str:
        return self._fstype

    @property
    def size(self) -> int:
        return self.diskmap.device_size if self.diskmap is not None else 0

    def free_space(self, window: ByteRange | None = None, *, batch: int = linux.FSMAP_BATCH) -> RangeSet:
        window = window or ByteRange(0, self.size)
        return linux.free_space(self.fd, self.dev, window.start, window.end, batch=batch)

    def file_extents(self, path: Path) -> FileExtents | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_dev != self.dev:
                return None
            ext = linux.fiemap(fd, sync=True)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESTALE, errno.EOPNOTSUPP, errno.ENOTTY):
                log.debug("fiemap %s: %s", path, exc)
            return None
        finally:
            os.close(fd)
        return FileExtents(inode=st.st_ino, ranges=ext.ranges, shared=ext.shared)

    def walk(self) -> Iterator[Path]:
        for root, dirs, files in os.walk(self._mount, onerror=None):
            here = Path(root)
            keep = []
            for d in dirs:
                try:
                    if os.lstat(here / d).st_dev == self.dev:
                        keep.append(d)
                except OSError:
                    continue
            dirs[:] = keep
            for name in files:
                yield here / name

    # -- the agent's own use --------------------------------------------------------------

    @property
    def disk_size(self) -> int:
        return self.diskmap.disk.size if self.diskmap is not None else 0

    @property
    def discard(self) -> bool:
        return self.diskmap.disk.discard if self.diskmap is not None else False

    def commit(self) -> None:
        """Make deletes visible and durable: statfs (XFS inodegc), then syncfs."""
        os.fstatvfs(self.fd)
        linux.syncfs(self.fd)

    def describe(self) -> str:
        where = self.diskmap.path if self.diskmap is not None else "no disk map"
        return (
            f"{self.mount} ({self.fstype} on {self.device}: {where}; disk id {self.disk_id!r}; {self.mode})"
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Verified:
    """The outcome of one verify: device bytes unless said otherwise."""

    window: ByteRange
    #: Every free range inside the window (what a capture driver settles against).
    free: RangeSet
    #: Free candidates that every verify hook agreed to: what is reported.
    found: RangeSet


def verify(
    fs: WatchedFs,
    candidates: RangeSet,
    pipeline: Pipeline,
    *,
    frozen: bool = False,
    batch: int = linux.FSMAP_BATCH,
) -> Verified:
    """Which candidates are free and committed (see the module docstring)."""
    candidates = candidates.clip(ByteRange(0, fs.size))
    window = candidates.bounds
    if not candidates:
        return Verified(window, RangeSet(), RangeSet())
    if not frozen:
        fs.commit()
    free = fs.free_space(window, batch=batch)
    if not frozen:
        linux.syncfs(fs.fd)
    found = pipeline.verified(str(fs.entry.mount), fs.device, free.intersect(candidates))
    return Verified(window, free, found)
