"""Offline sparsify: punch every free block of every supported guest filesystem.

``vmreclaim image sparsify IMAGE`` (DESIGN.md section 8) is the capture and verify
stages done from the host, for a VM that is shut down:

1. open the image through its format driver and take QEMU's write locks on it (a busy
   image is refused with exit 3 before anything is read), and keep them until the last
   punch: no VM may start and allocate blocks between our reading of the bitmaps and
   our punching of them;
2. read the partition table (:mod:`vmreclaim.core.volumes`) and ask the filesystem
   drivers (:mod:`vmreclaim.core.filesystems`) about each volume;
3. read the free space of every filesystem whose driver can, all of them *before* any
   punch, so a filesystem that must be refused (journal to replay, bad checksum) stops
   the whole run with nothing changed;
4. shift each filesystem's free ranges by its partition start and hand the union to
   :meth:`Pipeline.reclaim <vmreclaim.core.pipeline.Pipeline.reclaim>` — the same
   translate/validate/align/punch/measure path as every other reclaim.

With ``dry_run`` step 4 plans but does not punch, and the image is only checked for a
writer, not locked. A dry run of an image that a writer holds (a running VM) is an
**estimate** (issue 13): the filesystems are read as their on-disk structures stand —
a mounted filesystem's bitmaps lag its journal, so a block freed or taken since its last
commit may be counted wrongly — and the report says ``estimate``. Without ``dry_run`` a
busy image is always refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmreclaim.core import loader
from vmreclaim.core.driver import AUTO
from vmreclaim.core.errors import CorruptImageError, VMReclaimError
from vmreclaim.core.filesystems import FilesystemReader, ProgressCallback, identify
from vmreclaim.core.formats import Image
from vmreclaim.core.model import Disk
from vmreclaim.core.opening import open_image
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.reclaim import ReclaimReport
from vmreclaim.core.volumes import Volume, scan_volumes


@dataclass(frozen=True)
class FilesystemResult:
    """One volume of the disk and what sparsify found on it."""

    volume: Volume
    type: str | None
    block_size: int | None
    free_bytes: int
    skipped: str | None = None
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        v = self.volume
        return {
            "partition": v.number,
            "type": self.type,
            "block_size": self.block_size,
            "free_bytes": self.free_bytes,
            "start": v.start,
            "length": v.length,
            "scheme": v.scheme,
            "label": self.label,
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class SparsifyReport:
    """The outcome of one sparsify; :meth:`to_json` is the ``image sparsify`` document."""

    image: str
    format: str
    filesystems: list[FilesystemResult]
    punched_bytes: int
    freed_bytes: int
    seconds: float
    dry_run: bool = False
    #: A dry run of an image in use: read-only and approximate (see the module docstring).
    estimate: bool = False
    #: Free bytes that were not punched, per reason (``zero``, ``partial-block``, ...).
    not_punched: dict[str, int] = field(default_factory=dict)

    @property
    def free_bytes(self) -> int:
        return sum(f.free_bytes for f in self.filesystems)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "format": self.format,
            "filesystems": [f.to_json() for f in self.filesystems],
            "free_bytes": self.free_bytes,
            "punched_bytes": self.punched_bytes,
            "freed_bytes": self.freed_bytes,
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "estimate": self.estimate,
            "skipped": [{"reason": r, "bytes": n} for r, n in sorted(self.not_punched.items())],
        }


class Stages(Protocol):
    """Where sparsify reports its progress (the CLI draws a bar; the core draws nothing)."""

    def stage(self, description: str, *, pulse: bool = False) -> ProgressCallback:
        """A ``(done, total)`` callback for a new stage; ``pulse`` when the total is unknown."""
        ...


def sparsify_image(
    path: str | os.PathLike[str], format: str = AUTO, *, dry_run: bool = False, progress: Stages | None = None
) -> SparsifyReport:
    """Find the free blocks of every supported filesystem in the image and punch them.

    Raises :class:`~vmreclaim.core.errors.ImageBusyError` (exit 3) if another process
    holds the image for writing, and an :class:`~vmreclaim.core.errors.ImageError`
    (exit 4) if a filesystem or the partition table cannot be trusted; in both cases
    nothing is written.
    """
    started = time.monotonic()
    bar = progress if progress is not None else _Silent()
    with open_image(path, format) as image, _locked(image, dry_run) as (fd, busy):
        image.check_punchable()
        scan = scan_free_space(image, bar.stage, estimate=busy)
        report = _reclaim(image, scan.free, fd, dry_run, bar)
    not_punched: dict[str, int] = {}
    if report is not None:
        for skip in report.skipped:
            not_punched[skip.reason] = not_punched.get(skip.reason, 0) + skip.length
    return SparsifyReport(
        image=str(path),
        format=image.format_name,
        filesystems=scan.filesystems,
        punched_bytes=report.punched_bytes if report else 0,
        freed_bytes=report.freed_bytes if report else 0,
        seconds=time.monotonic() - started,
        dry_run=dry_run,
        estimate=busy,
        not_punched=not_punched,
    )


@contextmanager
def _locked(image: Image, dry_run: bool) -> Iterator[tuple[int, bool]]:
    """QEMU's write locks on the image (and its external data file) for the whole run;
    yields the descriptor to punch through and whether a writer holds the image.

    A dry run writes nothing, so it only checks for a writer: if one holds the image the
    run is an estimate (module docstring). A real run takes the locks, or raises
    :class:`~vmreclaim.core.errors.ImageBusyError` naming the holder.
    """
    if dry_run:
        files = {image.file.path: image.file, image.data_file.path: image.data_file}.values()
        busy = any(f.busy_reason() is not None for f in files)
        yield image.data_file.fd, busy
        return
    with ExitStack() as stack:
        if image.data_file is not image.file:
            stack.enter_context(image.file.hold_for_writing())
        yield stack.enter_context(image.data_file.hold_for_writing()), False


@dataclass(frozen=True)
class FreeSpaceScan:
    """What the guest filesystems of an image say is free, read from their structures."""

    #: Every volume, in disk order, with what was found on it.
    filesystems: list[FilesystemResult]
    #: Free bytes of the virtual disk (every readable filesystem's, shifted to disk offsets).
    free: RangeSet
    #: The bytes of the volumes whose filesystem was read: outside them nothing is known.
    covered: RangeSet

    @property
    def skipped(self) -> list[str]:
        """``"<volume>: <why>"`` for every volume whose free space was not read."""
        return [f"{f.volume.label}: {f.skipped}" for f in self.filesystems if f.skipped is not None]


def scan_free_space(
    image: Image, stage: Callable[[str], ProgressCallback] | None = None, *, estimate: bool = False
) -> FreeSpaceScan:
    """Identify every volume of ``image`` and read each readable filesystem's free bytes.

    The one reader of guest free space offline: ``image sparsify`` and the host
    daemon's offline reclaim both call it, so both refuse the same damaged filesystems
    (a driver raises an :class:`~vmreclaim.core.errors.ImageError` when a cross-check
    fails, a journal needs recovery, ...), every installed reader must load (a broken one
    raises :class:`~vmreclaim.core.errors.DriverLoadError`, never a silent skip), and a
    driver reporting free bytes past the end of its volume raises
    :class:`~vmreclaim.core.errors.VMReclaimError`. ``estimate`` (a dry run of an image
    in use, nothing punched): the readers may read stale structures rather than refuse
    (:meth:`FilesystemReader.free_space`).
    """
    readers = loader.load_all("filesystems", FilesystemReader)
    results: list[FilesystemResult] = []
    free = RangeSet()
    covered = RangeSet()
    volumes = scan_volumes(image)
    _refuse_a_whole_disk_filesystem_beside_a_table(image, volumes, readers)
    for volume in volumes:
        if volume.skip_reason is not None:
            results.append(FilesystemResult(volume, volume.content, None, 0, volume.skip_reason))
            continue
        found = identify(volume, readers)
        det = found.detection
        if found.skip_reason is not None or found.reader is None or det is None:
            results.append(
                FilesystemResult(
                    volume,
                    det.type if det else None,
                    det.block_size if det else None,
                    0,
                    found.skip_reason or "no filesystem reader",
                    det.label if det else "",
                )
            )
            continue
        progress = stage(f"{volume.label}: {det.type} bitmaps") if stage is not None else None
        # Only an estimate passes the keyword: a driver written before it still works.
        space = (
            found.reader.free_space(volume, det, progress, estimate=True)
            if estimate
            else found.reader.free_space(volume, det, progress)
        )
        if space.free and int(space.free.ends[-1]) > volume.length:
            # A driver bug, not a property of the image: refuse loudly (exit 1).
            raise VMReclaimError(
                f"{image.file.path}: {volume.label}: the {found.name} filesystem driver reported "
                "free bytes past the end of the volume; nothing was punched"
            )
        free = free.union(space.free.shift(volume.start))
        covered = covered.union(RangeSet([volume.start], [volume.start + min(volume.length, space.size)]))
        results.append(
            FilesystemResult(volume, det.type, space.block_size, space.free.total, None, det.label)
        )
    return FreeSpaceScan(results, free, covered)


def _refuse_a_whole_disk_filesystem_beside_a_table(
    image: Image, volumes: list[Volume], readers: dict[str, FilesystemReader]
) -> None:
    """A partition table and a whole-disk filesystem on the same disk is ambiguous.

    ext never uses sector 0, so an MBR there (planted by a guest, or left from before
    the disk was formatted whole) coexists with a whole-disk ext4; a "partition" of that
    table may then lie inside a file of the real filesystem, and its "free" space is that
    file's data. Which one the guest mounts cannot be told from the bytes: refuse, as
    ``blkid`` refuses an ambivalent probe, before anything is punched.
    """
    if all(v.number is None for v in volumes):
        return
    whole = identify(Volume(image, 0, image.virtual_size), readers).detection
    if whole is not None:
        scheme = next(v.scheme for v in volumes if v.number is not None)
        raise CorruptImageError(
            f"{image.file.path}: the disk holds both a {scheme} partition table and a whole-disk "
            f"{whole.type} filesystem; refusing to guess which one the guest uses"
        )


def _reclaim(image: Image, free: RangeSet, fd: int, dry_run: bool, bar: Stages) -> ReclaimReport | None:
    if not free:
        return None
    disk = Disk(vm="", id=Path(image.file.path).name, path=Path(image.file.path), format=image.format_name)
    done = bar.stage("planning" if dry_run else "punching", pulse=True)
    report = Pipeline().reclaim(disk, image, free, dry_run=dry_run, fd=fd)
    done(1, 1)
    return report


class _Silent:
    """No progress to show."""

    def stage(self, description: str, *, pulse: bool = False) -> ProgressCallback:
        return _ignore


def _ignore(done: int, total: int) -> None:
    return None
