"""The ``rbd`` format: a Ceph RBD image, named ``rbd:POOL/IMAGE[@SNAP][:conf=FILE][:id=USER]``.

The name is QEMU's (``-drive file=rbd:...``) and libvirt's ``<source protocol='rbd'
name='POOL/IMAGE'>``. An RBD image has no container format: guest byte ``g`` is byte
``g`` of the image, stored in RADOS objects of ``object_size`` bytes (4 MiB by default).
What the cluster holds is therefore counted in objects, and librbd tells which exist
(``Image.diff_iterate`` with ``whole_object``: the object map when the image has one).

How the map reads (host offsets are guest offsets):

* ``data`` — objects this image itself holds and no snapshot shares: written since the
  newest snapshot (all existing objects when there is none);
* ``shared`` — objects that exist in the image and in its newest snapshot unchanged:
  a discard would only hide them from the head, RADOS keeps the snapshot's clone, so
  nothing is freed and they are never discarded;
* ``unallocated`` — no object, and the image is a clone: reads fall through to the
  parent image, whose objects are the parent's and never touched;
* ``zero`` — no object and no parent: reads as zeros, nothing to free.

Reclaim is a librbd discard of whole objects, or of an object's tail (from a free
offset to the object's end: RADOS truncates the object), never of a head or middle
piece, which librbd would turn into a write of zeros. In a clone, librbd keeps an
empty object where the discarded one lay inside the parent overlap, so the guest
reads zeros and not the parent's bytes; the space is freed all the same.

Writing is offline only: the writer takes the image's exclusive lock in managed mode
(librbd then does not hand it over when another client asks) after checking that no
other client watches the image or owns its lock — a running QEMU does both, and its
disk is reclaimed through the hypervisor instead (a discard on QEMU's own block node).
Busy is exit 3, nothing written. Every librados/librbd error is mapped at this boundary
to the error tree (:func:`ceph_errors`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from vmreclaim.core.errors import (
    CorruptImageError,
    ImageBusyError,
    ImageError,
    UnsupportedImageError,
    UsageError,
    VMReclaimError,
)
from vmreclaim.core.extents import NO_OFFSET, ExtentKind, ExtentMap
from vmreclaim.core.formats import (
    MAX_STRUCTURE_READ,
    FormatCapabilities,
    Image,
    ImageFile,
    ImageFormat,
    ImageOpener,
)
from vmreclaim.core.lease import Lease
from vmreclaim.core.punch import PunchResult
from vmreclaim.core.ranges import ByteRange, RangeSet

#: Names of pools, images and snapshots we accept: Ceph allows more, but a name with
#: QEMU's separators (``/ @ :``) or its escape (``\\``) would be read differently by
#: QEMU and by us, so it is refused rather than guessed.
_NAME = r"[A-Za-z0-9_.+-]+"
_SPEC = re.compile(rf"rbd:(?P<pool>{_NAME})/(?P<image>{_NAME})(?:@(?P<snap>{_NAME}))?(?P<opts>(?::[^:]*)*)")
#: The QEMU options we understand; any other is refused (it could point us elsewhere).
_OPTIONS = ("conf", "id")
#: Seconds librados waits for the monitors / OSDs before an operation fails.
CONNECT_TIMEOUT = 20


@dataclass(frozen=True)
class RbdName:
    """A parsed ``rbd:`` name."""

    pool: str
    image: str
    snap: str | None = None
    conf: str | None = None
    id: str | None = None

    @classmethod
    def parse(cls, name: str) -> RbdName:
        match = _SPEC.fullmatch(name)
        if match is None:
            raise UsageError(
                f"{name}: not an RBD name: want rbd:POOL/IMAGE[@SNAP][:conf=FILE][:id=USER] "
                "(names of letters, digits and _ . + -)"
            )
        opts: dict[str, str] = {}
        for item in match.group("opts").split(":")[1:]:
            key, eq, value = item.partition("=")
            if key not in _OPTIONS or not eq or not value:
                allowed = ", ".join(k + "=" for k in _OPTIONS)
                raise UsageError(f"{name}: option {item!r}: only {allowed} are allowed")
            if key in opts:
                raise UsageError(f"{name}: option {key!r} given twice")
            opts[key] = value
        return cls(match["pool"], match["image"], match["snap"], opts.get("conf"), opts.get("id"))

    def __str__(self) -> str:
        at = f"@{self.snap}" if self.snap else ""
        return f"rbd:{self.pool}/{self.image}{at}"


def _bindings() -> tuple[Any, Any]:
    """Debian's ``rados`` and ``rbd`` modules, imported on first use: the driver loads
    (``vmreclaim plugins``, probing) where they are missing."""
    try:
        import rados
        import rbd
    except ImportError as exc:
        raise UnsupportedImageError(
            "RBD images need librados/librbd's Python bindings (Debian: python3-rados python3-rbd; "
            f"in a venv: python -m vmreclaim.testing.ceph link-bindings): {exc}"
        ) from exc
    return rados, rbd


def _mapping(rados: Any, rbd: Any) -> list[tuple[type[BaseException], type[VMReclaimError], str]]:
    """Library exception → our class and what it means, most specific first."""
    return [
        (rbd.ImageNotFound, UsageError, "no such image"),
        (rados.ObjectNotFound, UsageError, "no such pool or object"),
        (rbd.ObjectNotFound, UsageError, "no such object"),
        (rbd.ImageBusy, ImageBusyError, "image is busy"),
        (rados.ObjectBusy, ImageBusyError, "image is busy"),
        (rbd.ReadOnlyImage, ImageBusyError, "image is read-only (a snapshot, or another client's lock)"),
        (rbd.PermissionError, UsageError, "permission denied"),
        (rados.PermissionError, UsageError, "permission denied"),
        (rados.PermissionDeniedError, UsageError, "permission denied"),
        (rbd.FunctionNotSupported, UnsupportedImageError, "not supported by this image or cluster"),
        (rbd.OperationNotSupported, UnsupportedImageError, "not supported by this image or cluster"),
        (rbd.Timeout, ImageError, "the cluster did not answer in time"),
        (rados.TimedOut, ImageError, "the cluster did not answer in time"),
        (rados.InterruptedOrTimeoutError, ImageError, "the cluster did not answer in time"),
        (rbd.ConnectionShutdown, ImageError, "the connection to the cluster is gone"),
        (rados.ConnectionShutdown, ImageError, "the connection to the cluster is gone"),
        (rados.NotConnected, ImageError, "not connected to the cluster"),
        (rbd.NoSpace, ImageError, "the cluster is out of space"),
        (rados.NoSpace, ImageError, "the cluster is out of space"),
        (rbd.DiskQuotaExceeded, ImageError, "the pool quota is exceeded"),
        (rbd.Error, ImageError, "librbd failed"),
        (rados.Error, ImageError, "librados failed"),
    ]


@contextlib.contextmanager
def ceph_errors(what: str) -> Iterator[None]:
    """Map every librados/librbd error raised in the block to the error tree,
    naming ``what`` (the image and the operation); the original is the cause."""
    rados, rbd = _bindings()
    try:
        yield
    except (rados.Error, rbd.Error) as exc:
        for lib_type, our_type, meaning in _mapping(rados, rbd):
            if isinstance(exc, lib_type):
                raise our_type(f"{what}: {meaning}: {exc}") from exc
        raise ImageError(f"{what}: {exc}") from exc  # pragma: no cover - the table ends with both roots


class RbdConnection:
    """One librados client and the pool's I/O context, closed together."""

    def __init__(self, name: RbdName) -> None:
        rados, _ = _bindings()
        self.name = name
        if name.conf is not None and not Path(name.conf).is_file():
            raise UsageError(f"{name}: Ceph configuration {name.conf} does not exist")
        with ceph_errors(f"{name}: connecting to the cluster"):
            self.cluster = rados.Rados(conffile=name.conf or "", rados_id=name.id)
            for key in ("client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout"):
                self.cluster.conf_set(key, str(CONNECT_TIMEOUT))
            self.cluster.connect(timeout=CONNECT_TIMEOUT)
        try:
            with ceph_errors(f"{name}: opening pool {name.pool!r}"):
                self.ioctx = self.cluster.open_ioctx(name.pool)
        except BaseException:
            self.cluster.shutdown()
            raise

    def pool_usage(self) -> tuple[int, int]:
        """``(used, used + max available)`` bytes of the pool, from ``ceph df``."""
        import json

        with ceph_errors(f"{self.name}: ceph df"):
            ret, out, err = self.cluster.mon_command(json.dumps({"prefix": "df", "format": "json"}), b"")
        if ret != 0:
            raise ImageError(f"{self.name}: ceph df failed ({ret}): {err}")
        doc = json.loads(out)
        for pool in doc.get("pools", []):
            if pool.get("name") == self.name.pool:
                stats = pool["stats"]
                used = int(stats.get("bytes_used", stats.get("stored", 0)))
                return used, used + int(stats["max_avail"])
        raise UsageError(f"{self.name}: pool {self.name.pool!r} is not in ceph df")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ioctx.close()
        with contextlib.suppress(Exception):
            self.cluster.shutdown()


class RbdFile(ImageFile):
    """An RBD image as the storage under the format: reads, locks and discards go
    through librbd. ``path`` is the name (for messages), ``fd`` is -1 (no file)."""

    def __init__(self, name: RbdName) -> None:
        self.name = name
        self.path = Path(str(name))
        self.fd = -1
        self.is_block_device = False
        self.connection = RbdConnection(name)
        _, rbd = _bindings()
        try:
            with ceph_errors(f"{name}: opening the image"):
                self.rbd = rbd.Image(self.connection.ioctx, name.image, snapshot=name.snap, read_only=True)
                self.size = int(self.rbd.size())
                self.object_size = 1 << int(self.rbd.stat()["order"])
        except BaseException:
            self.connection.close()
            raise
        self._writer: Any = None

    # -- reading -----------------------------------------------------------------------

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or length > MAX_STRUCTURE_READ:
            raise CorruptImageError(f"{self.path}: {what} at {offset:#x} has an impossible length {length}")
        if offset + length > self.size:
            raise CorruptImageError(
                f"{self.path}: {what} at {offset:#x} (+{length:#x}) lies past the end of the image "
                f"(size {self.size:#x})"
            )
        with ceph_errors(f"{self.path}: reading {what} at {offset:#x}"):
            data = bytes(self.rbd.read(offset, length)) if length else b""
        if len(data) != length:
            raise CorruptImageError(
                f"{self.path}: short read of {what} at {offset:#x}: {len(data)} of {length} bytes"
            )
        return data

    def read_many(self, offsets: npt.NDArray[np.int64], length: int, what: str) -> npt.NDArray[np.uint8]:
        offs = np.asarray(offsets, dtype=np.int64).reshape(-1)
        out = np.empty((offs.size, length), dtype=np.uint8)
        for i, off in enumerate(offs.tolist()):
            out[i] = np.frombuffer(self.read(off, length, what), dtype=np.uint8)
        return out

    def refresh_size(self) -> None:
        with ceph_errors(f"{self.path}: size"):
            self.size = int(self.rbd.size())

    def extents(self, window: ByteRange, since: str | None) -> RangeSet:
        """Objects of this image (not its parent) that exist inside ``window`` and were
        written since snapshot ``since`` (``None``: all), in whole objects."""
        starts: list[int] = []
        ends: list[int] = []

        def found(offset: int, length: int, exists: bool) -> int:
            if exists:
                starts.append(offset)
                ends.append(offset + length)
            return 0

        if window.length:
            with ceph_errors(f"{self.path}: listing objects (diff_iterate)"):
                self.rbd.diff_iterate(
                    window.start, window.length, since, found, include_parent=False, whole_object=True
                )
        return RangeSet(starts, ends).intersect(RangeSet([window.start], [window.end]))

    def allocated_bytes(self) -> int:
        """Bytes of the objects this image holds (``rbd du``), parent and snapshots not counted."""
        return self.extents(ByteRange(0, self.size), None).total

    # -- writing (offline) -------------------------------------------------------------

    def busy_reason(self) -> str | None:
        return _busy_reason(self.rbd, self.connection.cluster.get_instance_id())

    @contextlib.contextmanager
    def hold_for_writing(self) -> Iterator[int]:
        if self.name.snap is not None:
            raise UnsupportedImageError(f"{self.path}: a snapshot is read-only; name the image itself")
        rados, rbd = _bindings()
        own = self.connection.cluster.get_instance_id()
        with ceph_errors(f"{self.path}: opening for writing"):
            writer = rbd.Image(self.connection.ioctx, self.name.image)
        try:
            # Look before taking anything: asking for a lock a running QEMU holds would
            # make QEMU hand it over (librbd's cooperative lock transition).
            reason = _busy_reason(writer, own)
            if reason is not None:
                raise ImageBusyError(f"{self.path}: image is busy: {reason}; stop it first")
            exclusive = bool(writer.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK)
            if exclusive:
                # Managed mode: librbd will not hand the lock to another client that
                # asks (a QEMU starting now fails to write instead of taking it).
                with ceph_errors(f"{self.path}: taking the exclusive lock"):
                    writer.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            # Set first, test again: a client that appeared before our lock is seen now.
            reason = _busy_reason(writer, own, lock_is_ours=exclusive)
            if reason is not None:
                raise ImageBusyError(f"{self.path}: image is busy: {reason}; stop it first")
            self._writer = writer
            yield -1
        finally:
            self._writer = None
            with contextlib.suppress(rados.Error, rbd.Error):
                writer.close()  # releases the lock

    def held(self, fd: int, window: ByteRange) -> RangeSet:
        return self.extents(window, None)  # whole objects: a tail's object is held

    def punch_block_size(self, fd: int) -> int:
        return self.object_size

    def punchable(self, ranges: RangeSet, block_size: int) -> RangeSet:
        """Whole objects and object tails inside ``ranges``: a range piece that does not
        reach its object's end would be written as zeros by librbd, so it is left."""
        obj = self.object_size
        ends = ranges.ends
        tail_ends = np.minimum((ranges.starts // obj + 1) * obj, self.size)
        # A range keeps [start, ...) when it runs to its first object's end (a tail or a
        # whole object); otherwise it starts at the next object boundary.
        starts = np.where(ends >= tail_ends, ranges.starts, -(-ranges.starts // obj) * obj)
        # It ends at the last object boundary inside it, or at the image's end.
        stops = np.where(ends >= self.size, ends, (ends // obj) * obj)
        keep = stops > starts
        return RangeSet(starts[keep], stops[keep])

    def punch(self, fd: int, ranges: RangeSet, lease: Lease | None) -> PunchResult:
        if self._writer is None:
            raise VMReclaimError(f"{self.path}: discard without the write lock (a bug)")
        before = self.allocated_bytes()
        for start, end in zip(ranges.starts.tolist(), ranges.ends.tolist(), strict=True):
            if lease is not None:
                lease.check()
            with ceph_errors(f"{self.path}: discarding [{start}, {end})"):
                self._writer.discard(start, end - start)
        return PunchResult(punched_bytes=ranges.total, freed_bytes=before - self.allocated_bytes())

    def sync(self, fd: int) -> None:
        if self._writer is not None:
            with ceph_errors(f"{self.path}: flush"):
                self._writer.flush()

    def close(self) -> None:
        rados, rbd = _bindings()
        with contextlib.suppress(rados.Error, rbd.Error):
            self.rbd.close()
        self.connection.close()


def _busy_reason(image: Any, own: int, *, lock_is_ours: bool = False) -> str | None:
    """Why another client forbids our writing ``image``: it watches the image (a running
    QEMU does), owns its exclusive lock, or holds an advisory lock; ``own`` is our
    librados instance id (our own handles watch too)."""
    _, rbd = _bindings()
    with ceph_errors("checking the image's clients"):
        watchers = [w for w in image.watchers_list() if int(w["id"]) != own]
        owners: list[Any] = []
        if not lock_is_ours and image.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK:
            try:
                owners = list(image.lock_get_owners())
            except rbd.InvalidArgument:
                owners = []  # a read-only handle cannot ask (dry runs); watchers still tell
        lockers = image.list_lockers()
    if watchers:
        addrs = ", ".join(str(w["addr"]) for w in watchers)
        return f"another client watches it ({addrs}): a running VM?"
    if owners:
        return "another client owns its exclusive lock (" + ", ".join(str(o) for o in owners) + ")"
    if lockers and lockers.get("lockers"):
        return "it has advisory locks (see rbd lock ls)"
    return None


class RbdImage(Image):
    """An RBD image mapped 1:1 from guest offsets (see the module docstring)."""

    file: RbdFile

    def __init__(self, file: RbdFile) -> None:
        super().__init__(file, "rbd")
        with ceph_errors(f"{file.path}: snapshots and parent"):
            snaps = sorted(file.rbd.list_snaps(), key=lambda s: int(s["id"]))
            try:
                file.rbd.parent_info()
                self.has_parent = True
            except Exception as exc:  # rbd.ImageNotFound: no parent
                _, rbd = _bindings()
                if not isinstance(exc, rbd.ImageNotFound):
                    raise
                self.has_parent = False
        #: The newest snapshot: objects unchanged since it are shared with it.
        self.newest_snap: str | None = str(snaps[-1]["name"]) if snaps and file.name.snap is None else None
        self.snapshots = [str(s["name"]) for s in snaps]

    @property
    def virtual_size(self) -> int:
        return self.file.size

    @property
    def cluster_size(self) -> int:
        return self.file.object_size

    def metadata_ranges(self) -> RangeSet:
        return RangeSet()  # the image's header and object map are separate RADOS objects

    def map(self, window: ByteRange) -> ExtentMap:
        present = self.file.extents(window, None)
        if self.file.name.snap is not None:
            own, shared = RangeSet(), present  # a snapshot's objects are never ours to discard
        elif self.newest_snap is not None:
            own = self.file.extents(window, self.newest_snap).intersect(present)
            shared = present.subtract(own)
        else:
            own, shared = present, RangeSet()
        absent = present.complement(window)
        empty_kind = ExtentKind.UNALLOCATED if self.has_parent else ExtentKind.ZERO
        parts = [
            (own, ExtentKind.DATA, own.starts),
            (shared, ExtentKind.SHARED, shared.starts),
            (absent, empty_kind, np.full(len(absent), NO_OFFSET)),
        ]
        starts = np.concatenate([p[0].starts for p in parts])
        ends = np.concatenate([p[0].ends for p in parts])
        kinds = np.concatenate([np.full(len(p[0]), p[1]) for p in parts]).astype(np.uint8)
        offsets = np.concatenate([np.asarray(p[2], dtype=np.int64) for p in parts])
        order = np.argsort(starts, kind="stable")
        result = ExtentMap(starts[order], (ends - starts)[order], kinds[order], offsets[order])
        result.require_covers(window, f"{self.file.path}: rbd map")
        return result

    def check_punchable(self) -> None:
        if self.file.name.snap is not None:
            raise UnsupportedImageError(f"{self.file.path}: a snapshot is read-only; name the image itself")

    def read(self, offset: int, length: int) -> bytes:
        # librbd reads the parent where the clone has no object: one call, no map.
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise UsageError(
                f"read of [{offset}, {offset + length}) lies outside the {self.virtual_size}-byte disk"
            )
        return self.file.read(offset, length, "guest data")

    def info(self) -> dict[str, Any]:
        doc = super().info()
        doc["snapshots"] = self.snapshots
        doc["parent"] = self.has_parent
        return doc


class RbdFormat(ImageFormat):
    """Driver ``rbd``: Ceph RBD images, opened by name through librbd (never probed)."""

    capabilities: ClassVar[FormatCapabilities] = FormatCapabilities(named_images=True, storage_usage=True)

    def probe(self, file: ImageFile) -> int:
        return 0  # a file is never an RBD image

    def open(self, file: ImageFile, opener: ImageOpener) -> Image:
        raise UsageError(f"{file.path}: RBD images are named rbd:POOL/IMAGE, not files")

    def open_named(self, name: str) -> Image:
        file = RbdFile(RbdName.parse(name))
        try:
            return RbdImage(file)
        except BaseException:
            file.close()
            raise

    def storage_usage(self, name: str) -> tuple[int, int]:
        """``(used, total)`` bytes of the image's pool: ``ceph df``'s used and used plus
        max available, so a pool shared by many hosts drives the threshold policy."""
        connection = RbdConnection(RbdName.parse(name))
        try:
            return connection.pool_usage()
        finally:
            connection.close()
