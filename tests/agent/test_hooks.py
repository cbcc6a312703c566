"""The agent's stages call the pipeline's hooks: capture and verify filters only narrow."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.agent.conftest import LoopFs, MiB, write_file
from vmreclaim import hookimpl
from vmreclaim.agent.watched import WatchedFs, verify
from vmreclaim.core.config import FilesystemEntry
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.plugins import Plugins
from vmreclaim.core.ranges import RangeSet

pytestmark = [pytest.mark.root]


class KeepAbove:
    """A verify hook that vetoes everything below ``cut`` and tries (in vain) to add."""

    def __init__(self, cut: int) -> None:
        self.cut = cut
        self.calls: list[tuple[str, str]] = []

    @hookimpl
    def vmreclaim_verify_filter(self, mount: str, device: str, ranges: RangeSet) -> RangeSet:
        self.calls.append((mount, device))
        return RangeSet.from_ranges([(self.cut, 2**40)]).union(RangeSet.from_ranges([(0, 4096)]))


def test_verify_hooks_narrow_and_never_widen(loopfs: Callable[..., LoopFs]) -> None:
    fs = loopfs("ext4")
    victim = write_file(fs.mount / "v", 8 * MiB)
    ext = fs.extents(victim)
    victim.unlink()
    hook = KeepAbove(int(ext.starts[0]) + 4 * MiB)
    pipeline = Pipeline(Plugins([hook], load_entry_points=False))
    target = WatchedFs(FilesystemEntry(mount=fs.mount, disk="d"))
    try:
        v = verify(target, ext, pipeline)
        assert hook.calls == [(str(fs.mount), target.device)]
        assert v.found == ext.intersect(RangeSet.from_ranges([(hook.cut, 2**40)]))
        assert v.free.contains(ext)  # the driver still learns what is free
        # Under a fence the same hooks apply (no syncfs: the freeze committed everything).
        assert verify(target, ext, pipeline, frozen=True).found == v.found
        # The hook's (0, 4096) was never a candidate: it is not reported.
        assert not v.found.intersect(RangeSet.from_ranges([(0, 4096)]))
    finally:
        target.close()
