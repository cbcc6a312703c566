"""The filesystem plugin kind: free-block discovery of a guest filesystem read offline.

A filesystem driver (entry-point group ``vmreclaim.filesystems``) subclasses
:class:`FilesystemReader`. Given a :class:`~vmreclaim.core.volumes.Volume` (a partition
or the whole disk, read through the format driver), it answers two questions:

* :meth:`FilesystemReader.probe` — is this my filesystem? (a :class:`Detection`, or
  ``None``); cheap, reads the superblock only;
* :meth:`FilesystemReader.free_space` — which bytes of the volume hold no data, from the
  filesystem's own allocation structures (block bitmaps, free-space trees).

Drivers that only recognise a filesystem (so that ``image sparsify`` can list it as
skipped with the reason, instead of "unknown") set ``capabilities.free_space = False``
and explain why in :attr:`FilesystemReader.skip_reason`; the core never calls their
``free_space``. Adding support for a filesystem is one module and one entry point.

Drivers never write and never decide what is punched: they return volume-relative
free ranges, and the core shifts them by the partition start and hands them to the
same reclaim pipeline every other path uses (DESIGN.md section 4). A driver must refuse
(raise an :class:`~vmreclaim.core.errors.ImageError` naming the structure) rather than
guess whenever its structures may be stale or inconsistent — a journal that needs
recovery, a checksum that does not match, counts that disagree.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from vmreclaim.core import loader
from vmreclaim.core.driver import Driver
from vmreclaim.core.errors import UnsupportedImageError
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.volumes import Volume

#: ``progress(done, total)``: how far a driver is through its structures (any unit).
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class FilesystemCapabilities:
    """What a filesystem driver can do beyond recognising its filesystem."""

    #: :meth:`FilesystemReader.free_space` reads the free blocks of the filesystem.
    free_space: bool = True


@dataclass(frozen=True)
class Detection:
    """A filesystem a driver recognised on a volume."""

    #: Type as ``blkid`` names it: ``ext4``, ``xfs``, ``swap``, ...
    type: str
    #: Allocation unit in bytes (an ext4 bigalloc cluster, an NTFS cluster), if known.
    block_size: int | None = None
    label: str = ""
    uuid: str = ""
    #: Set when the driver recognises this volume but will not read it (an ext4
    #: external journal device, a swap area holding a hibernation image).
    skip_reason: str | None = None


@dataclass(frozen=True)
class FreeSpace:
    """The free bytes of one filesystem, relative to the start of its volume."""

    free: RangeSet
    #: The unit the free ranges are made of (block, or cluster under bigalloc).
    block_size: int
    #: Bytes the filesystem spans on its volume.
    size: int


class FilesystemReader(Driver):
    """Base class of filesystem drivers."""

    kind = "filesystems"
    capabilities: ClassVar[FilesystemCapabilities] = FilesystemCapabilities()
    #: For detect-only drivers: why the free space of this filesystem is not read.
    skip_reason: ClassVar[str] = ""

    @abstractmethod
    def probe(self, volume: Volume) -> Detection | None:
        """Recognise the filesystem on ``volume``, or return ``None`` if it is not ours.

        Must be cheap (a superblock read) and must not raise for a volume that simply
        holds something else. Raise :class:`~vmreclaim.core.errors.CorruptImageError`
        only when the filesystem's own magic matches but its superblock cannot be valid.
        """

    def free_space(
        self,
        volume: Volume,
        detection: Detection,
        progress: ProgressCallback | None = None,
        *,
        estimate: bool = False,
    ) -> FreeSpace:
        """The free byte ranges of the filesystem (capability ``free_space``).

        Every range must lie inside the volume and consist of whole allocation units
        that the filesystem's on-disk structures mark free *and* that are committed as
        free (no journal replay pending). Raise an
        :class:`~vmreclaim.core.errors.ImageError` naming the structure when that
        cannot be established; nothing is punched then.

        ``estimate``: nothing will be punched (a dry run of an image in use): a driver
        may then read structures that are only stale — a journal to replay, an unclean
        unmount — rather than refuse; never structures that are inconsistent.

        .. versionchanged:: 0.1 ``estimate``
        """
        raise UnsupportedImageError(
            f"{volume.image.file.path}: {volume.label}: {detection.type}: "
            f"{self.skip_reason or 'free space is not read by this driver'}"
        )


@dataclass(frozen=True)
class Identified:
    """The driver that recognised a volume, or the reason none could be used."""

    name: str | None
    reader: FilesystemReader | None
    detection: Detection | None
    skip_reason: str | None = None


def identify(volume: Volume, readers: dict[str, FilesystemReader] | None = None) -> Identified:
    """Ask every installed filesystem driver about ``volume``.

    Two drivers claiming the same volume is a conflict we do not resolve by guessing
    (a stale signature of an old filesystem may survive a reformat): the volume is
    skipped, as ``blkid`` refuses ambiguous probes.
    """
    if readers is None:
        readers = loader.load_all("filesystems", FilesystemReader)
    found = [(name, r, d) for name, r in sorted(readers.items()) if (d := r.probe(volume)) is not None]
    if not found:
        return Identified(None, None, None, "no supported filesystem signature found")
    if len(found) > 1:
        types = " and ".join(d.type for _, _, d in found)
        return Identified(None, None, found[0][2], f"ambiguous: {types} signatures found on the same volume")
    name, reader, detection = found[0]
    reason = detection.skip_reason
    if reason is None and not reader.capabilities.free_space:
        reason = reader.skip_reason or f"{detection.type}: free space is not read offline"
    return Identified(name, reader, detection, reason)
