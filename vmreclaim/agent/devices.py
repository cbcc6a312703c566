"""From a mounted filesystem to the virtual disk under it, through sysfs.

GETFSMAP, FIEMAP and FITRIM speak in bytes of the block device that holds the
filesystem (``/dev/vda1``, ``/dev/mapper/vg-root``); records speak in bytes of the
virtual disk (``/dev/vda``) because that is what the host's image stores. The
translation walks the stack down to a whole disk:

* a **partition** adds its ``start``, which sysfs gives in 512-byte units whatever the
  logical block size is;
* a **device-mapper** device is followed through its live table (DM_TABLE_STATUS): only
  ``linear`` targets have a byte-for-byte mapping (LVM's plain logical volumes, kpartx);
  anything else (crypt, thin, raid, striped, snapshot) makes the filesystem unusable for
  records rather than guessed at;
* anything else with no ``partition`` file and no ``dm/`` directory is a whole disk.

The result is a piecewise map (:class:`DiskMap`) from device bytes to disk bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmreclaim.agent import linux
from vmreclaim.core.ranges import ByteRange, RangeSet

SECTOR = 512
#: A stack deeper than this (partition on dm on dm ...) is refused as a loop.
MAX_DEPTH = 16


class _TopologyError(Exception):
    """The device stack under a filesystem cannot be translated to one virtual disk.

    Private to the agent: :mod:`vmreclaim.agent.watched` turns it into an
    :class:`~vmreclaim.core.errors.AgentSetupError` (no mount) or into the
    ``fitrim-only`` mode (a device that maps to no single disk); it never leaves the agent.
    """


@dataclass(frozen=True)
class Segment:
    """Device bytes ``[start, start + length)`` are disk bytes ``[disk_start, ...)``."""

    start: int
    length: int
    disk_start: int


@dataclass(frozen=True)
class Disk:
    """A whole block device as the guest sees it."""

    name: str
    size: int
    serial: str | None
    discard: bool


@dataclass(frozen=True)
class DiskMap:
    """How the bytes of one block device lie on one virtual disk."""

    device: str
    device_size: int
    disk: Disk
    segments: tuple[Segment, ...]
    #: How the stack was walked, for logs: ``loop3p1 (+1048576) → loop3``.
    path: str

    def to_disk(self, ranges: RangeSet) -> RangeSet:
        """Device bytes → disk bytes; bytes outside every segment are dropped."""
        out = [ranges.clip(ByteRange(s.start, s.length)).shift(s.disk_start - s.start) for s in self.segments]
        return _union(out)

    def to_device(self, ranges: RangeSet) -> RangeSet:
        """Disk bytes → device bytes; bytes of the disk outside this device are dropped."""
        out = [
            ranges.clip(ByteRange(s.disk_start, s.length)).shift(s.start - s.disk_start)
            for s in self.segments
        ]
        return _union(out)


def _union(parts: list[RangeSet]) -> RangeSet:
    if not parts:
        return RangeSet()
    return RangeSet(np.concatenate([p.starts for p in parts]), np.concatenate([p.ends for p in parts]))


class Topology:
    """Reads the block-device stack from sysfs (``root``, normally ``/sys``).

    ``dm_table`` reads a device-mapper table by name; both are parameters so that the
    translation of stacks this machine cannot build (device-mapper needs a kernel with
    ``dm-mod``) is tested on a copy of their sysfs layout.
    """

    def __init__(
        self, root: Path = Path("/sys"), dm_table: Callable[[str], list[linux.DmTarget]] = linux.dm_table
    ):
        self.root = root
        self.dm_table = dm_table

    def sysfs_dir(self, dev: int) -> Path:
        """The sysfs directory of block device ``dev`` (a ``dev_t``)."""
        link = self.root / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}"
        if not link.exists():
            raise _TopologyError(f"device {os.major(dev)}:{os.minor(dev)} is not a block device (no {link})")
        return link.resolve()

    def map_device(self, dev: int) -> DiskMap:
        """The map from block device ``dev`` to the one virtual disk holding it."""
        sysdir = self.sysfs_dir(dev)
        size = int(_read(sysdir / "size")) * SECTOR
        steps: list[str] = []
        pieces = self._resolve(dev, 0, size, steps, 0)
        disks = {p[2] for p in pieces}
        if len(disks) != 1:
            names = ", ".join(sorted(d.name for d in disks))
            raise _TopologyError(f"/dev/{sysdir.name} spans several disks ({names}); records need one disk")
        (disk,) = disks
        segments = tuple(sorted((Segment(s, n, ds) for s, n, _, ds in pieces), key=lambda seg: seg.start))
        return DiskMap(
            device=f"/dev/{sysdir.name}",
            device_size=size,
            disk=disk,
            segments=segments,
            path=" → ".join([*dict.fromkeys(steps), disk.name]),
        )

    def _resolve(self, dev: int, lo: int, hi: int, steps: list[str], depth: int) -> list[Piece]:
        """Where bytes ``[lo, hi)`` of ``dev`` lie, as pieces in ``dev``'s coordinates."""
        if depth > MAX_DEPTH:
            raise _TopologyError(f"block device stack deeper than {MAX_DEPTH} levels")
        sysdir = self.sysfs_dir(dev)
        if (sysdir / "partition").exists():
            offset = int(_read(sysdir / "start")) * SECTOR
            steps.append(f"{sysdir.name} (+{offset})")
            parent = _dev_of(sysdir.parent)
            inner = self._resolve(parent, lo + offset, hi + offset, steps, depth + 1)
            return [(s - offset, n, d, ds) for s, n, d, ds in inner]
        if (sysdir / "dm").is_dir():
            return self._resolve_dm(sysdir, lo, hi, steps, depth)
        return [(lo, hi - lo, disk_info(sysdir), lo)]

    def _resolve_dm(self, sysdir: Path, lo: int, hi: int, steps: list[str], depth: int) -> list[Piece]:
        dm_name = _read(sysdir / "dm" / "name")
        try:
            table = self.dm_table(dm_name)
        except OSError as exc:
            raise _TopologyError(
                f"cannot read the device-mapper table of {dm_name}: {exc.strerror or exc}"
            ) from exc
        steps.append(f"{sysdir.name} ({dm_name})")
        pieces: list[Piece] = []
        for target in table:
            t_lo, t_hi = target.start * SECTOR, (target.start + target.length) * SECTOR
            seg_lo, seg_hi = max(lo, t_lo), min(hi, t_hi)
            if seg_lo >= seg_hi:
                continue
            if target.type != "linear":
                raise _TopologyError(
                    f"device-mapper {dm_name} uses a {target.type!r} target at sector {target.start}: only "
                    "'linear' maps bytes one to one"
                )
            under, offset = _linear_params(dm_name, target.params)
            u_lo = offset * SECTOR + (seg_lo - t_lo)
            for s, n, d, ds in self._resolve(under, u_lo, u_lo + (seg_hi - seg_lo), steps, depth + 1):
                pieces.append((seg_lo + (s - u_lo), n, d, ds))
        if sum(p[1] for p in pieces) != hi - lo:
            raise _TopologyError(f"device-mapper {dm_name} table leaves bytes of [{lo}, {hi}) unmapped")
        return pieces


Piece = tuple[int, int, Disk, int]  # (device start, length, disk, disk start)


def _read(path: Path) -> str:
    return path.read_text().strip()


def _dev_of(sysdir: Path) -> int:
    major, minor = _read(sysdir / "dev").split(":")
    return os.makedev(int(major), int(minor))


def disk_info(sysdir: Path) -> Disk:
    """Size, serial and discard support of a whole disk."""
    size = int(_read(sysdir / "size")) * SECTOR
    serial = None
    for name in ("serial", "device/serial", "wwid"):
        try:
            text = _read(sysdir / name)
        except OSError:
            continue
        if text:
            serial = text
            break
    try:
        discard = int(_read(sysdir / "queue" / "discard_max_bytes")) > 0
    except (OSError, ValueError):
        discard = False
    return Disk(name=sysdir.name, size=size, serial=serial, discard=discard)


def _linear_params(dm_name: str, params: str) -> tuple[int, int]:
    """``MAJ:MIN OFFSET`` of a linear target (the kernel prints devices as numbers)."""
    try:
        device, offset = params.split()
        major, minor = device.split(":")
        return os.makedev(int(major), int(minor)), int(offset)
    except ValueError:
        raise _TopologyError(
            f"device-mapper {dm_name}: linear target parameters {params!r} are not 'MAJ:MIN OFFSET'"
        ) from None


@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/self/mountinfo``."""

    mount: Path
    dev: int
    fstype: str
    source: str
    options: str


def find_mount(path: Path) -> MountInfo:
    """The mount that holds ``path``: the longest mount point that is ``path`` or one of
    its parents; of several on the same point, the last (it hides the others).

    The device numbers of mountinfo and ``stat`` are not compared: btrfs gives each
    subvolume its own anonymous ``st_dev``.
    """
    real = Path(os.path.realpath(path))
    best: MountInfo | None = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            info = _parse_mountinfo(line)
            if info is None or not (real == info.mount or info.mount in real.parents):
                continue
            if best is None or len(info.mount.parts) >= len(best.mount.parts):
                best = info
    if best is None:
        raise _TopologyError(f"{path}: no mount in /proc/self/mountinfo holds it")
    return best


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _parse_mountinfo(line: str) -> MountInfo | None:
    left, sep, right = line.partition(" - ")
    if not sep:
        return None
    fields, tail = left.split(), right.split()
    if len(fields) < 6 or len(tail) < 2:
        return None
    major, minor = fields[2].split(":")
    return MountInfo(
        mount=Path(_unescape(fields[4])),
        dev=os.makedev(int(major), int(minor)),
        fstype=tail[0],
        source=_unescape(tail[1]),
        options=tail[2] if len(tail) > 2 else "",
    )
