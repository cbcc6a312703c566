"""Fixtures of the agent tests: loop-mounted filesystems, a test-side host, the agent."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agent.peer import HostPeer
from tests.guest.conftest import guest_kit  # noqa: F401 (the real guest's kit, built once per session)
from vmreclaim.agent import linux
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing import require_root, require_tool, run
from vmreclaim.testing.linux import loop_device, make_filesystem, mounted

MiB = 1024 * 1024
#: mkfs.xfs refuses filesystems under 300 MB.
SIZES = {"ext4": 128 * MiB, "xfs": 320 * MiB, "btrfs": 256 * MiB}


@dataclass
class LoopFs:
    """A filesystem on a loop device: ``image`` plays the VM's disk image."""

    image: Path
    disk: Path  # the loop device (the "virtual disk")
    device: Path  # the device holding the filesystem (the disk or a partition)
    mount: Path
    fstype: str
    offset: int  # where the filesystem starts on the disk

    def extents(self, *paths: Path) -> RangeSet:
        """FIEMAP (flushed) of files, as virtual-disk byte ranges."""
        out = RangeSet()
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                out = out.union(linux.fiemap(fd).ranges)
            finally:
                os.close(fd)
        return out.shift(self.offset)

    def tree_extents(self, top: Path) -> RangeSet:
        files = [Path(r) / f for r, _, fs in os.walk(top) for f in fs]
        return self.extents(*files)

    def free(self) -> RangeSet:
        """GETFSMAP free space now, virtual-disk bytes."""
        fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            linux.syncfs(fd)
            return linux.free_space(fd, os.fstat(fd).st_dev, 0, 2**62).shift(self.offset)
        finally:
            os.close(fd)

    def allocated(self) -> int:
        """Bytes the image file occupies on the host."""
        return os.stat(self.image).st_blocks * 512


@pytest.fixture
def loopfs(tmp_path: Path) -> Iterator[Callable[..., LoopFs]]:
    """Factory: ``loopfs("ext4" | "xfs" | "btrfs", partition=False, mkfs_args=())``."""
    require_root()
    stack = contextlib.ExitStack()

    def make(
        fstype: str = "ext4", *, partition: bool = False, mkfs_args: tuple[str, ...] = (), name: str = "fs"
    ) -> LoopFs:
        require_tool(f"mkfs.{fstype}", "losetup")
        size = SIZES[fstype]
        image = tmp_path / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size + (4 * MiB if partition else 0))
        offset = 0
        if partition:
            require_tool("sfdisk", "partx")
            # 1 MiB + 512 bytes: an odd start proves the 512-byte units of sysfs 'start'.
            table = f"label: dos\nstart=2049, size={size // 512}, type=83\n"
            subprocess.run(["sfdisk", "-q", str(image)], input=table, text=True, check=True)
            offset = 2049 * 512
        disk = stack.enter_context(loop_device(image, partscan=partition))
        device = disk
        if partition:
            part = Path(f"{disk}p1")
            if not part.exists():
                subprocess.run(["partx", "-a", str(disk)], capture_output=True)
            assert part.exists(), f"no {part} after losetup -P and partx -a"
            device = part
        if fstype == "btrfs":
            run(["mkfs.btrfs", "-q", "-f", *mkfs_args, str(device)])
        else:
            make_filesystem(device, fstype, *mkfs_args)
        mnt = stack.enter_context(mounted(device, tmp_path / f"{name}-mnt"))
        return LoopFs(image, disk, device, mnt, fstype, offset)

    try:
        yield make
    finally:
        stack.close()


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[HostPeer]:
    host = HostPeer(tmp_path / "host.sock")
    try:
        yield host
    finally:
        host.close()


def agent_config(tmp_path: Path, *filesystems: LoopFs, **extra: Any) -> dict[str, Any]:
    """An agent config: the unix socket of :func:`peer`, a spool outside the tested fs."""
    config: dict[str, Any] = {
        "transport": {"driver": "unix", "path": str(tmp_path / "host.sock")},
        "filesystems": [{"mount": str(fs.mount), "disk": f"disk{i}"} for i, fs in enumerate(filesystems)],
        "spool": str(tmp_path / "spool"),
        "log_level": "debug",
        "capture": {"driver": "fsmap", "debounce_seconds": 0.2},
    }
    config.update(extra)
    return config


def write_file(path: Path, size: int, *, seed: int = 0) -> Path:
    """A file of ``size`` pseudo-random bytes, fsynced (so its extents are real)."""
    block = (seed.to_bytes(4, "little") * 16384)[: 64 * 1024]
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return path
