"""The capture contract: what the agent relies on from every capture driver, against a
real filesystem on a loop device (root, ``mkfs.<fstype>``, ``losetup``).

Subclass :class:`CaptureContract` as ``Test<Something>`` and set ``driver`` (and
``options``, ``fstype`` if the defaults do not fit)::

    class TestMyCapture(CaptureContract):
        driver = "my-capture"

The driver is loaded through its entry point and handed a
:class:`~vmreclaim.core.captures.CaptureTarget` as the agent hands it one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from vmreclaim.core import loader
from vmreclaim.core.captures import Capture, CaptureCapabilities, CaptureOptions, FsEvent, FsEventKind
from vmreclaim.core.ranges import ByteRange, RangeSet
from vmreclaim.testing.helpers import require_root
from vmreclaim.testing.linux import loop_mounted, make_filesystem

MIB = 1 << 20


def _write(path: Path, size: int, seed: int) -> Path:
    block = (seed.to_bytes(4, "little") * 16384)[: 64 * 1024]
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return path


class CaptureContract:
    """Every capture driver: candidates stay on the device, a deleted file's blocks
    become candidates, what was just reported free is not offered again, and no event
    (overflow, scan, a path already gone) makes it fail."""

    #: The driver's entry-point name in ``vmreclaim.captures``.
    driver: ClassVar[str]
    #: Its options as in the agent's YAML (``capture: {driver: ..., <here>}``).
    options: ClassVar[dict[str, Any]] = {}
    #: The filesystem the suite makes (it must answer GETFSMAP).
    fstype: ClassVar[str] = "ext4"
    #: Size of that filesystem.
    size: ClassVar[int] = 64 * MIB

    @pytest.fixture
    def target(self, tmp_path: Path) -> Iterator[Any]:
        """A :class:`~vmreclaim.agent.watched.WatchedFs` on a fresh loop-mounted filesystem."""
        require_root()
        from vmreclaim.agent.watched import WatchedFs
        from vmreclaim.core.config import FilesystemEntry

        image = tmp_path / f"capture.{self.fstype}"
        with open(image, "wb") as f:
            f.truncate(self.size)
        make_filesystem(image, self.fstype)
        with loop_mounted(image, tmp_path / "mnt") as (_dev, mnt):
            fs = WatchedFs(FilesystemEntry(mount=mnt, disk="contract"))
            try:
                yield fs
            finally:
                fs.close()

    def make(self) -> Capture:
        cls = loader.driver_class("captures", self.driver)
        return loader.load_driver("captures", self.driver, Capture, cls.Options.model_validate(self.options))

    @staticmethod
    def extents(target: Any, path: Path) -> RangeSet:
        found = target.file_extents(path)
        assert found is not None, path
        ranges: RangeSet = found.ranges
        return ranges

    def begin(self, target: Any) -> Capture:
        capture = self.make()
        target.commit()
        capture.begin(target, target.free_space())
        return capture

    def test_is_installed_as_a_capture(self) -> None:
        cls = loader.driver_class("captures", self.driver)
        assert issubclass(cls, Capture) and issubclass(cls.Options, CaptureOptions)
        assert isinstance(cls.capabilities, CaptureCapabilities)

    def test_candidates_lie_on_the_device(self, target: Any) -> None:
        capture = self.begin(target)
        keep = _write(target.mount / "keep", 2 * MIB, 1)
        gone = _write(target.mount / "gone", 3 * MIB, 2)
        capture.observe([FsEvent(FsEventKind.WRITTEN, path=p, inode=p.stat().st_ino) for p in (keep, gone)])
        gone.unlink()
        target.commit()
        capture.observe([FsEvent(FsEventKind.DELETED, path=gone), FsEvent(FsEventKind.SCAN)])
        assert not capture.candidates().subtract(RangeSet.from_ranges([(0, target.size)]))

    def test_a_deleted_files_blocks_become_candidates(self, target: Any) -> None:
        capture = self.begin(target)
        path = _write(target.mount / "victim", 4 * MIB, 3)
        capture.observe([FsEvent(FsEventKind.WRITTEN, path=path, inode=path.stat().st_ino)])
        blocks = self.extents(target, path)
        assert blocks.total >= 4 * MIB
        path.unlink()
        target.commit()
        capture.observe([FsEvent(FsEventKind.DELETED, path=path)])
        missing = blocks.subtract(capture.candidates())
        assert not missing, f"{self.driver}: freed blocks {missing} of a deleted file are not candidates"

    def test_what_was_settled_free_is_not_offered_again(self, target: Any) -> None:
        capture = self.begin(target)
        path = _write(target.mount / "victim", 4 * MIB, 4)
        capture.observe([FsEvent(FsEventKind.WRITTEN, path=path, inode=path.stat().st_ino)])
        path.unlink()
        target.commit()
        capture.observe([FsEvent(FsEventKind.DELETED, path=path)])
        whole = ByteRange(0, target.size)
        free = target.free_space()
        capture.settle(whole, free)
        assert not capture.candidates().intersect(free)

    def test_no_event_makes_it_fail(self, target: Any) -> None:
        capture = self.begin(target)
        ghost = target.mount / "never-existed"
        capture.observe(
            [
                FsEvent(FsEventKind.WRITTEN, path=ghost, inode=999_999),
                FsEvent(FsEventKind.MODIFIED, path=ghost),
                FsEvent(FsEventKind.MOVED, path=ghost),
                FsEvent(FsEventKind.DELETED, path=ghost),
                FsEvent(FsEventKind.OVERFLOW),
                FsEvent(FsEventKind.SCAN),
                FsEvent(FsEventKind.DELETED),
            ]
        )
        assert isinstance(capture.candidates(), RangeSet)
