"""Plain helpers behind the fixtures; usable from benchmarks and scripts too."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from vmreclaim.core.model import DeletionRecord, Disk
from vmreclaim.core.ranges import RangeSet


def is_root() -> bool:
    return os.geteuid() == 0


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


def require_root() -> None:
    """Skip the calling test with a stated reason unless running as root."""
    if not is_root():
        pytest.skip("needs root (loop devices, mount, FUSE); CI runs as root")


def require_tool(*names: str) -> None:
    """Skip the calling test unless every named program is on PATH."""
    missing = [n for n in names if not have_tool(n)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (installed by scripts/setup.sh)")


def run(cmd: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float = 120) -> str:
    """Run a command, return its stdout; on failure raise with its stderr shown."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(str(c) for c in cmd)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc.stdout


def make_record(
    ranges: Iterable[tuple[int, int]], *, vm: str = "vm1", disk: str = "disk0", seq: int = 0, fs: str = "ext4"
) -> DeletionRecord:
    """A valid deletion record for ``ranges`` of ``(offset, length)`` pairs."""
    return DeletionRecord(vm=vm, disk=disk, ranges=RangeSet.from_ranges(ranges), fs=fs, seq=seq)


def make_disk(
    path: str | os.PathLike[str], *, vm: str = "vm1", id: str = "disk0", format: str = "auto"
) -> Disk:
    """A :class:`Disk` for an image file."""
    return Disk(vm=vm, id=id, path=Path(path), format=format)


def make_raw_image(
    path: str | os.PathLike[str], size: int, data: Iterable[tuple[int, int]] = (), *, seed: int = 1
) -> Path:
    """A sparse raw file of ``size`` bytes with pseudo-random data at ``(offset, length)``."""
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data:
            f.seek(offset)
            f.write(_pattern(length, seed + offset))
    return path


def _pattern(length: int, seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, size=length, dtype=np.uint8).tobytes()


@contextmanager
def qemu_io_holding(image: str | os.PathLike[str], fmt: str = "raw") -> Iterator[subprocess.Popen[str]]:
    """A ``qemu-io`` process holding ``image`` open read-write (QEMU's locks taken)."""
    require_tool("qemu-io")
    proc = subprocess.Popen(
        ["qemu-io", "-f", fmt, str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_lock(Path(image), proc)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _wait_for_lock(image: Path, proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    from vmreclaim.core.locks import busy_reason

    deadline = time.monotonic() + timeout
    fd = os.open(image, os.O_RDONLY)
    try:
        while busy_reason(fd) is None:
            if proc.poll() is not None:
                raise AssertionError(f"qemu-io exited early: {proc.stderr.read() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise AssertionError(f"qemu-io did not lock {image} within {timeout}s")
            time.sleep(0.02)
    finally:
        os.close(fd)
