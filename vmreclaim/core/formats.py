"""The format plugin kind: guest ranges of a virtual disk → byte ranges of an image file.

A format driver (entry-point group ``vmreclaim.formats``) subclasses
:class:`ImageFormat`. It recognises its files (:meth:`ImageFormat.probe`) and parses
one into an :class:`Image` (:meth:`ImageFormat.open`). An ``Image`` answers three
questions the rest of vmreclaim asks, and nothing else:

* :meth:`Image.map` — where each guest byte lives and whether it may be punched
  (``data``) or not (``shared``, ``compressed``, ``zero``, ``unallocated``);
* :meth:`Image.metadata_ranges` — host bytes that are the format's own structures and
  must never be punched, whatever a map says (the core checks both);
* :meth:`Image.check_punchable` — whether the image's state allows punching at all
  (a dirty or corrupt qcow2, a VHD with saved state: no).

A driver never writes the image itself. Punching, alignment, locking and measuring are
the core's (:mod:`vmreclaim.core.reclaim`), the same for every format. The one write a
driver asks for is :meth:`Image.deep_discard` (capability ``deep_reclaim``, qcow2
only, offline, after the core's punch): it hands the discards to QEMU's ``qemu-io`` so
that QEMU, not vmreclaim, rewrites the format's tables. Every offset and length a
driver reads from an image is untrusted: it goes through :class:`ImageFile`'s
bounds-checked reads, and anything out of bounds is a :class:`CorruptImageError` that
names the structure and the offset.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from vmreclaim.core.driver import Driver
from vmreclaim.core.errors import CorruptImageError, ImageError, UnsupportedImageError, UsageError
from vmreclaim.core.extents import ExtentKind, ExtentMap
from vmreclaim.core.lease import Lease
from vmreclaim.core.locks import busy_reason, hold_for_writing
from vmreclaim.core.punch import PunchResult, allocated_bytes, held_ranges, host_block_size, punch_holes
from vmreclaim.core.ranges import ByteRange, RangeSet

_BLKGETSIZE64 = 0x80081272

#: Reads of image structures are capped: no table of a supported format needs more in
#: one piece, and a hostile header must not make us allocate gigabytes.
MAX_STRUCTURE_READ = 256 * 1024 * 1024
#: Above this many separate reads, :meth:`ImageFile.read_many` reads on two threads.
_PARALLEL_READS = 2048


class ImageFile:
    """One image file (or block device) opened read-only, with bounds-checked reads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            # O_NONBLOCK: a FIFO named by a hostile header (a backing file) must not
            # hang the open; it is refused just below, like any non-file.
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise UsageError(f"{self.path}: no such image file") from exc
        except IsADirectoryError as exc:
            raise UsageError(f"{self.path}: is a directory, not an image file") from exc
        except OSError as exc:
            raise UsageError(f"{self.path}: cannot open: {exc.strerror}") from exc
        st = os.fstat(self.fd)
        if stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            buf = bytearray(8)
            fcntl.ioctl(self.fd, _BLKGETSIZE64, buf, True)
            self.size = struct.unpack("=Q", buf)[0]
        else:
            os.close(self.fd)
            raise UsageError(f"{self.path}: not a regular file or block device")
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)

    def read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at ``offset``; ``what`` names the structure for errors."""
        if offset < 0 or length < 0 or length > MAX_STRUCTURE_READ:
            raise CorruptImageError(f"{self.path}: {what} at {offset:#x} has an impossible length {length}")
        if offset + length > self.size:
            raise CorruptImageError(
                f"{self.path}: {what} at {offset:#x} (+{length:#x}) lies past end of file "
                f"(size {self.size:#x})"
            )
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:  # EIO from a failing disk, EBADF after close: not a bug here
            raise ImageError(f"{self.path}: reading {what} at {offset:#x} failed: {exc.strerror}") from exc
        if len(data) != length:
            raise CorruptImageError(
                f"{self.path}: short read of {what} at {offset:#x}: {len(data)} of {length} bytes"
            )
        return data

    def read_array(self, offset: int, count: int, dtype: str, what: str) -> npt.NDArray[Any]:
        """``count`` items of numpy ``dtype`` (e.g. ``'>u8'``) at ``offset``."""
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.read(offset, count * itemsize, what), dtype=dtype)

    def refresh_size(self) -> None:
        """Learn the file's size again (a live image grows as its guest writes)."""
        if not self.is_block_device:
            self.size = os.fstat(self.fd).st_size

    def read_many(self, offsets: npt.NDArray[np.int64], length: int, what: str) -> npt.NDArray[np.uint8]:
        """``length`` bytes at each of ``offsets``, as a ``(len(offsets), length)`` array.

        For tables scattered through a file (qcow2 L2 tables, VHD block bitmaps): every
        offset is bounds-checked at once, then runs of adjacent structures are read in
        one ``pread`` each, so a contiguous layout costs one system call, not thousands.
        """
        offs = np.asarray(offsets, dtype=np.int64).reshape(-1)
        out = np.empty((offs.size, length), dtype=np.uint8)
        if not offs.size or not length:
            return out
        if length > MAX_STRUCTURE_READ:
            raise CorruptImageError(
                f"{self.path}: {what} at {int(offs[0]):#x} has an impossible length {length}"
            )
        bad = (offs < 0) | (offs > self.size - length)
        if bool(bad.any()):
            first = int(offs[int(np.argmax(bad))])
            raise CorruptImageError(
                f"{self.path}: {what} at {first:#x} (+{length:#x}) lies past end of file "
                f"(size {self.size:#x})"
            )
        order = np.argsort(offs, kind="stable")
        sorted_offs = offs[order]
        # A new read starts wherever a structure does not begin where the previous ended,
        # and after every MAX_STRUCTURE_READ bytes so one read stays bounded.
        breaks = np.flatnonzero(sorted_offs[1:] != sorted_offs[:-1] + length) + 1
        per_read = max(1, MAX_STRUCTURE_READ // length)
        starts = np.unique(np.concatenate([[0], breaks, np.arange(0, offs.size, per_read)]))
        ends = np.append(starts[1:], offs.size)
        buf = np.empty((offs.size, length), dtype=np.uint8)
        runs = list(zip(starts.tolist(), ends.tolist(), sorted_offs[starts].tolist(), strict=True))

        def read_runs(part: list[tuple[int, int, int]]) -> None:
            for lo, hi, at in part:
                want = (hi - lo) * length
                try:
                    got = os.preadv(self.fd, [buf[lo:hi].data], at)
                except OSError as exc:
                    raise ImageError(
                        f"{self.path}: reading {what} at {at:#x} failed: {exc.strerror}"
                    ) from exc
                if got != want:
                    raise CorruptImageError(
                        f"{self.path}: short read of {what} at {at:#x}: {got} of {want} bytes"
                    )

        if len(runs) >= _PARALLEL_READS:
            # Thousands of small scattered reads (VHD bitmaps) are bound by system-call
            # cost; two threads (os.preadv releases the GIL) nearly halve it.
            from concurrent.futures import ThreadPoolExecutor

            half = len(runs) // 2
            with ThreadPoolExecutor(max_workers=2) as pool:
                for done in [pool.submit(read_runs, runs[:half]), pool.submit(read_runs, runs[half:])]:
                    done.result()
        else:
            read_runs(runs)
        out[order] = buf
        return out

    def allocated_bytes(self) -> int:
        """Bytes the host filesystem has allocated for the file (``st_blocks``)."""
        if self.is_block_device:
            return self.size
        return allocated_bytes(self.fd)

    # -- writing: how this storage is locked and punched ------------------------------
    # A local file or block device is locked with QEMU's OFD protocol and punched with
    # fallocate. Storage that is not a local file (an RBD image: a format driver's own
    # ImageFile subclass) overrides these five, and the core's write path stays one.

    def busy_reason(self) -> str | None:
        """Why another client forbids writing this storage now, or ``None``."""
        return busy_reason(self.fd)

    def hold_for_writing(self) -> AbstractContextManager[int]:
        """Exclusive write access for a block: yields the descriptor punches go through,
        or raises :class:`~vmreclaim.core.errors.ImageBusyError` with nothing written."""
        return hold_for_writing(self.path)

    def held(self, fd: int, window: ByteRange) -> RangeSet:
        """The byte ranges inside ``window`` that this storage holds (what a punch frees)."""
        return held_ranges(fd, window)

    def punch_block_size(self, fd: int) -> int:
        """The unit a punch frees (the host filesystem's block)."""
        return host_block_size(fd)

    def punchable(self, ranges: RangeSet, block_size: int) -> RangeSet:
        """The parts of host ``ranges`` a punch may be asked to free without touching a
        byte outside them: whole ``block_size`` blocks."""
        return ranges.align_inward(block_size)

    def punch(self, fd: int, ranges: RangeSet, lease: Lease | None) -> PunchResult:
        """Free ``ranges`` (from :meth:`punchable`) and measure what was freed."""
        return punch_holes(fd, ranges, path=str(self.path), lease=lease)

    def sync(self, fd: int) -> None:
        """Make the punches durable."""
        os.fsync(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def first_overlap(starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]) -> tuple[int, int] | None:
    """Indices ``(i, j)`` of two ranges that overlap (``j`` starts inside ``i``), or ``None``.

    Drivers check their structures with it: two tables, blocks or bitmaps sharing host
    bytes mean a corrupt (or hostile) image. Vectorised: one sort, one running maximum.
    """
    if starts.size < 2:
        return None
    order = np.argsort(starts, kind="stable")
    s = starts[order]
    e = s + lengths[order]
    run_end = np.maximum.accumulate(e)
    clash = np.flatnonzero(s[1:] < run_end[:-1])
    if not clash.size:
        return None
    k = int(clash[0]) + 1
    holder = int(np.flatnonzero(e[:k] > s[k])[-1])
    return int(order[holder]), int(order[k])


class ImageOpener(Protocol):
    """How a format driver reaches the other files its image names, through the core.

    Drivers never open a backing image or an external data file themselves: the core
    decides whether a name read from the image may be followed at all. It may not when
    the image's format was *probed* for a writing command — then the header is bytes a
    guest could have written (a qcow2 header planted in a raw disk naming a neighbour's
    image, DESIGN.md section 4 rule 6), and both calls raise
    :class:`~vmreclaim.core.errors.UnsupportedImageError`.
    """

    def __call__(self, path: Path, format: str) -> Image:
        """Open the backing image ``path`` read-only as ``format`` ("": probe it)."""

    def data_file(self, path: Path) -> ImageFile:
        """Open the external data file ``path`` (read-only here; the core punches it)."""


@dataclass(frozen=True)
class FormatCapabilities:
    """What a format driver can do beyond mapping; checked by the core, never probed."""

    #: The format can chain to a backing/parent image.
    backing_files: bool = False
    #: ``image reclaim --deep``: the driver can also release whole clusters in the
    #: image's own metadata (offline only) so the hypervisor reuses them.
    deep_reclaim: bool = False
    #: Images of this driver are named, not files: ``NAME:...`` where ``NAME`` is the
    #: driver's entry-point name (``rbd:pool/image``) is opened with
    #: :meth:`ImageFormat.open_named`, as QEMU's protocol prefixes are.
    named_images: bool = False
    #: The driver can report the usage of the storage its images live in
    #: (:meth:`ImageFormat.storage_usage`): a shared pool, not the host's disk.
    storage_usage: bool = False


class Image(ABC):
    """A parsed, read-only view of one image file."""

    def __init__(self, file: ImageFile, format_name: str) -> None:
        self.file = file
        self.format_name = format_name
        #: The opened backing image, if any; drivers set it in their constructor.
        self.backing: Image | None = None
        self._capabilities = FormatCapabilities()

    @property
    def capabilities(self) -> FormatCapabilities:
        """The capabilities of the driver that opened it (set by the core's opener),
        less those this particular image cannot offer (:meth:`deep_reclaim_refusal`)."""
        if self._capabilities.deep_reclaim and self.deep_reclaim_refusal() is not None:
            return replace(self._capabilities, deep_reclaim=False)
        return self._capabilities

    @capabilities.setter
    def capabilities(self, value: FormatCapabilities) -> None:
        self._capabilities = value

    # -- what every driver must answer ---------------------------------------------------

    @property
    @abstractmethod
    def virtual_size(self) -> int:
        """Size of the virtual disk in bytes, as the hypervisor sees it."""

    @property
    @abstractmethod
    def cluster_size(self) -> int:
        """Allocation unit of the format in bytes (raw: the host filesystem block)."""

    @abstractmethod
    def map(self, window: ByteRange) -> ExtentMap:
        """The extents covering ``window`` (inside the disk) in order, without gaps.

        Host offsets refer to :attr:`data_file`. Only ``DATA`` extents may be punched;
        the driver decides that conservatively: when in doubt, not ``DATA``.
        """

    @abstractmethod
    def metadata_ranges(self) -> RangeSet:
        """Host byte ranges of :attr:`data_file` that hold the format's own structures."""

    # -- optional, with safe defaults ------------------------------------------------

    @property
    def data_file(self) -> ImageFile:
        """The file holding guest data (an external qcow2 data file, else the image)."""
        return self.file

    def check_punchable(self) -> None:
        """Raise an :class:`~vmreclaim.core.errors.ImageError` if punching is unsafe now."""
        return None

    def backing_chain(self) -> list[str]:
        """Paths of the backing images, nearest first."""
        chain: list[str] = []
        image = self.backing
        while image is not None:
            chain.append(str(image.file.path))
            image = image.backing
        return chain

    def allocated_bytes(self) -> int:
        """Host bytes allocated to this image (its data file included), not its backing."""
        total = self.file.allocated_bytes()
        if self.data_file is not self.file:
            total += self.data_file.allocated_bytes()
        return total

    def info(self) -> dict[str, Any]:
        """The ``image info`` document; drivers may add keys of their own."""
        return {
            "format": self.format_name,
            "virtual_size": self.virtual_size,
            "cluster_size": self.cluster_size,
            "allocated_bytes": self.allocated_bytes(),
            "backing": self.backing_chain(),
        }

    def refresh(self) -> None:
        """Forget cached tables so that the next :meth:`map` reads them from the file.

        A live caller calls it after raising its fence (DESIGN.md section 4, rule 4):
        a mapping read before may be stale. Drivers with caches override it.
        """
        return None

    def deep_reclaim_refusal(self) -> str | None:
        """Why this image cannot take ``--deep`` although its driver can, or ``None``."""
        return None

    def deep_discard(self, guest_ranges: RangeSet) -> None:
        """Release whole clusters in the image's metadata (capability ``deep_reclaim``)."""
        reason = self.deep_reclaim_refusal() or f"{self.format_name} images have no deep reclaim mode"
        raise UnsupportedImageError(f"{self.file.path}: {reason}")

    def read_compressed(self, start: int, length: int) -> bytes:
        """Guest bytes of a ``COMPRESSED`` extent; formats with compression override."""
        raise UnsupportedImageError(
            f"{self.file.path}: reading compressed {self.format_name} data is not supported"
        )

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset + length)`` as the virtual disk shows them.

        Used by offline readers (filesystem plugins); backing files are read, never
        written.
        """
        window = ByteRange(offset, length)
        if window.end > self.virtual_size:
            raise UsageError(f"read of {window} lies outside the {self.virtual_size}-byte virtual disk")
        out = bytearray(length)
        for ext in self.map(window):
            lo = ext.start - offset
            if ext.kind in (ExtentKind.DATA, ExtentKind.SHARED) and ext.offset is not None:
                out[lo : lo + ext.length] = self.data_file.read(ext.offset, ext.length, "data")
            elif ext.kind is ExtentKind.COMPRESSED:
                out[lo : lo + ext.length] = self.read_compressed(ext.start, ext.length)
            elif ext.kind is ExtentKind.UNALLOCATED and self.backing is not None:
                inside = max(0, min(ext.length, self.backing.virtual_size - ext.start))
                if inside:
                    out[lo : lo + inside] = self.backing.read(ext.start, inside)
        return bytes(out)

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
        if self.data_file is not self.file:
            self.data_file.close()
        self.file.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageFormat(Driver):
    """Base class of format drivers (entry-point group ``vmreclaim.formats``)."""

    kind = "formats"
    capabilities: ClassVar[FormatCapabilities] = FormatCapabilities()

    @abstractmethod
    def probe(self, file: ImageFile) -> int:
        """How sure the driver is that ``file`` is in its format.

        0 means "not mine"; a magic number that matches is worth 100. Format ``auto``
        picks the highest answer, so a catch-all such as raw answers 1.
        """

    @abstractmethod
    def open(self, file: ImageFile, opener: ImageOpener) -> Image:
        """Parse ``file`` into an :class:`Image`, validating every structure it reads.

        ``opener(path, format)`` opens a backing image and ``opener.data_file(path)``
        an external data file, through the core (which may refuse to follow them). Raise
        :class:`CorruptImageError` or :class:`UnsupportedImageError` with a message that
        names the structure and offset when the file cannot be handled.
        """

    def open_named(self, name: str) -> Image:
        """Open the image called ``name`` (capability ``named_images``)."""
        raise UsageError(f"{name}: the {type(self).__name__} driver does not open images by name")

    def storage_usage(self, name: str) -> tuple[int, int]:
        """``(used_bytes, total_bytes)`` of the storage holding image ``name``
        (capability ``storage_usage``): the policy's storage state for such images."""
        raise UsageError(f"{name}: the {type(self).__name__} driver does not report storage usage")
