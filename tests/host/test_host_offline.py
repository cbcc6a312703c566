"""Offline reclaim: an image nobody holds is punched directly — but only where the
guest filesystem's own structures say the blocks are free now."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hosttest import MiB, Site, allocated, eventually, running

from vmreclaim.core import loader
from vmreclaim.core.filesystems import FreeSpace
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing import qemu_io_holding, require_tool, run
from vmreclaim.testing.linux import loop_device

BLOCK = 4096


def ext4_image(root: Path, files: dict[str, int], size: int = 32 * MiB) -> Path:
    require_tool("mkfs.ext4", "debugfs", "e2fsck")
    src = root / "src"
    src.mkdir()
    for name, length in files.items():
        (src / name).write_bytes(os.urandom(length))
    image = root / "vm1.raw"
    with open(image, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-d", str(src), str(image)])
    return image


def file_ranges(image: Path, name: str) -> RangeSet:
    blocks = [int(b) for b in run(["debugfs", "-R", f"blocks /{name}", str(image)]).split()]
    assert blocks, name
    return RangeSet.from_ranges([(b * BLOCK, BLOCK) for b in blocks])


def delete(image: Path, name: str) -> None:
    run(["debugfs", "-w", "-R", f"rm /{name}", str(image)])


def dump(image: Path, name: str, out: Path) -> bytes:
    run(["debugfs", "-R", f"dump /{name} {out}", str(image)])
    return out.read_bytes()


def pairs(ranges: RangeSet) -> list[tuple[int, int]]:
    return [(s, n) for s, n in ranges.to_pairs()]


async def send_once(channel: Path, ranges: list[tuple[int, int]]) -> None:
    """Records from an agent that then goes away (the VM is shut down afterwards)."""
    from vmreclaim.testing.host import AgentPeer

    peer = AgentPeer(channel, on_fence=lambda f: "shutting down")
    await peer.connect()
    seq = await peer.send_record(ranges)
    await peer.wait_answered(seq)
    assert seq in peer.acked
    await peer.close()


def test_a_stopped_vm_is_reclaimed_offline_where_its_filesystem_says_free(site: Site, tmp_path: Path) -> None:
    image = ext4_image(tmp_path, {"keep": 600_000, "gone1": 1_500_000, "gone2": 900_000})
    kept = dump(image, "keep", tmp_path / "keep.before")
    gone = file_ranges(image, "gone1").union(file_ranges(image, "gone2"))
    live = file_ranges(image, "keep")
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    config = site.config(reclaim={"tick_seconds": 0.1, "retry_max_seconds": 60})

    async def main() -> None:
        async with running(config) as daemon:
            # The guest reported its deletions, plus — wrongly, or before reusing them —
            # the blocks of a file that exists now: the offline check must catch that.
            await send_once(channel, pairs(gone.union(live)))
            delete(image, "gone1")
            delete(image, "gone2")
            before = allocated(image)
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.totals.reclaims >= 1 and not rt.busy, timeout=30)
            attempt = rt.last_attempt
            assert attempt is not None and attempt.mode == "offline" and attempt.outcome == "done"
            assert attempt.verified_bytes == gone.total
            assert rt.totals.freed_bytes == before - allocated(image)
            assert before - allocated(image) >= 0.99 * gone.total
            assert not rt.pending

    asyncio.run(main())
    assert dump(image, "keep", tmp_path / "keep.after") == kept
    run(["e2fsck", "-fn", str(image)])


def test_offline_reclaim_waits_while_a_process_holds_the_image(site: Site, tmp_path: Path) -> None:
    require_tool("qemu-io")
    image = ext4_image(tmp_path, {"gone": 1_000_000})
    gone = file_ranges(image, "gone")
    delete(image, "gone")
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    config = site.config(reclaim={"tick_seconds": 0.1, "retry_max_seconds": 0.3})

    async def main() -> None:
        async with running(config) as daemon:
            await send_once(channel, pairs(gone))
            rt = daemon.disks["vm1/disk0"]
            before = allocated(image)
            with qemu_io_holding(image):
                await eventually(lambda: rt.last_attempt is not None and not rt.busy)
                assert rt.last_attempt is not None and rt.last_attempt.outcome == "postponed"
                assert "runs and its agent is not connected" in rt.last_attempt.detail
                assert allocated(image) == before and rt.pending
            # Once the holder is gone, the next try reclaims.
            await eventually(lambda: rt.totals.freed_bytes >= 0.99 * gone.total, timeout=20)

    asyncio.run(main())


def test_ranges_no_filesystem_vouches_for_stay_pending(site: Site) -> None:
    image = site.raw_disk("vm1.raw")  # random bytes: no filesystem at all
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    config = site.config(reclaim={"tick_seconds": 0.1, "retry_max_seconds": 60})

    async def main() -> None:
        async with running(config) as daemon:
            await send_once(channel, [(0, MiB)])
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.last_attempt is not None and not rt.busy)
            assert rt.last_attempt is not None and rt.last_attempt.mode == "offline"
            assert "not verified" in rt.last_attempt.detail
            assert rt.pending.exact() == RangeSet.from_ranges([(0, MiB)])
            assert rt.totals.punched_bytes == 0

    asyncio.run(main())
    assert allocated(image) == 8 * MiB


@pytest.mark.root
def test_an_image_on_a_loop_device_is_not_punched_offline(site: Site, tmp_path: Path) -> None:
    image = ext4_image(tmp_path, {"gone": 1_000_000})
    gone = file_ranges(image, "gone")
    delete(image, "gone")
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    config = site.config(reclaim={"tick_seconds": 0.1, "retry_max_seconds": 60})
    before = allocated(image)

    async def main() -> None:
        async with running(config) as daemon:
            await send_once(channel, pairs(gone))
            rt = daemon.disks["vm1/disk0"]
            with loop_device(image) as dev:
                await eventually(lambda: rt.last_attempt is not None and not rt.busy)
                assert rt.last_attempt is not None and f"attached to {dev}" in rt.last_attempt.detail
            assert rt.pending and allocated(image) == before

    asyncio.run(main())
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)


class LyingReader:
    """A filesystem driver with a bug: the real ext reader, plus one free block past the
    end of its volume (a hostile or broken third-party driver can say anything)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def free_space(self, volume: Any, detection: Any, progress: Any = None) -> FreeSpace:
        space: FreeSpace = self._real.free_space(volume, detection, progress)
        beyond = RangeSet([volume.length], [volume.length + BLOCK])
        return FreeSpace(space.free.union(beyond), space.block_size, space.size)


def test_offline_mode_refuses_a_filesystem_driver_that_reports_free_bytes_past_its_volume(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host's offline mode reads free space with the same scan as `image sparsify`,
    # so it refuses what sparsify refuses: a driver answer outside the volume stops the
    # attempt with nothing punched, even for ranges the answer would also cover.
    image = ext4_image(tmp_path, {"gone": 1_000_000})
    gone = file_ranges(image, "gone")
    delete(image, "gone")
    real_load_all = loader.load_all

    def load_all(kind: str, base: Any) -> Any:
        drivers = real_load_all(kind, base)
        if kind == "filesystems":
            drivers = {name: LyingReader(d) if name == "ext" else d for name, d in drivers.items()}
        return drivers

    monkeypatch.setattr(loader, "load_all", load_all)
    channel = site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    config = site.config(reclaim={"tick_seconds": 0.1, "retry_max_seconds": 60})
    before = allocated(image)

    async def main() -> None:
        async with running(config) as daemon:
            await send_once(channel, pairs(gone))
            rt = daemon.disks["vm1/disk0"]
            await eventually(lambda: rt.last_attempt is not None and not rt.busy)
            attempt = rt.last_attempt
            assert attempt is not None and attempt.mode == "offline" and attempt.outcome == "failed"
            assert "free bytes past the end of the volume" in attempt.detail
            assert rt.pending.exact() == gone and rt.totals.punched_bytes == 0

    asyncio.run(main())
    assert allocated(image) == before
