"""Real block devices for tests: loop devices, mounts, and live images served by QEMU.

Each helper is a context manager that always cleans up (unmount, detach, kill), even
when the test fails, because the machine is shared with other test runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from vmreclaim.testing.helpers import require_root, require_tool, run


@contextmanager
def loop_device(image: str | os.PathLike[str], *, partscan: bool = False) -> Iterator[Path]:
    """Attach ``image`` to a free loop device (``losetup -f``) and yield its path."""
    require_root()
    require_tool("losetup")
    args = ["losetup", "-f", "--show"] + (["-P"] if partscan else []) + [str(image)]
    dev = Path(run(args).strip())
    try:
        yield dev
    finally:
        for _ in range(50):
            if subprocess.run(["losetup", "-d", str(dev)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


@contextmanager
def mounted(
    device: str | os.PathLike[str], mountpoint: str | os.PathLike[str], *, options: Sequence[str] = ()
) -> Iterator[Path]:
    """Mount ``device`` on ``mountpoint`` (created if needed); unmount afterwards."""
    require_root()
    mnt = Path(mountpoint)
    mnt.mkdir(parents=True, exist_ok=True)
    opts = ["-o", ",".join(options)] if options else []
    run(["mount", *opts, str(device), str(mnt)])
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def make_filesystem(device_or_file: str | os.PathLike[str], fstype: str = "ext4", *args: str) -> None:
    """``mkfs.<fstype>`` with quiet, forced defaults plus ``args``."""
    # Each mkfs spells "quiet" and "overwrite whatever is there" its own way.
    defaults = {
        "ext2": ["-q", "-F"],
        "ext3": ["-q", "-F"],
        "ext4": ["-q", "-F"],
        "xfs": ["-q", "-f"],
        "btrfs": ["-q", "-f"],
        "vfat": [],
    }.get(fstype, ["-q"])
    require_tool(f"mkfs.{fstype}")
    run([f"mkfs.{fstype}", *defaults, *args, str(device_or_file)])


@contextmanager
def loop_mounted(
    image: str | os.PathLike[str], mountpoint: str | os.PathLike[str], *, options: Sequence[str] = ()
) -> Iterator[tuple[Path, Path]]:
    """``image`` (holding a filesystem) on a loop device, mounted: yields (device, mountpoint)."""
    with loop_device(image) as dev, mounted(dev, mountpoint, options=options) as mnt:
        yield dev, mnt


@contextmanager
def qemu_fuse_export(
    image: str | os.PathLike[str],
    export: str | os.PathLike[str],
    fmt: str = "qcow2",
    *,
    discard: bool = True,
    qmp: str | os.PathLike[str] | None = None,
    export_id: str = "disk0",
) -> Iterator[subprocess.Popen[bytes]]:
    """Serve ``image`` through a real QEMU block layer as a writable FUSE file ``export``.

    ``qemu-storage-daemon`` holds the image open and locked as a running VM would; with
    ``discard`` both block nodes say ``discard=unmap`` so guest discards reach the image
    file (DESIGN.md section 7). Losetup the export file to get a block device. With
    ``qmp`` the daemon also has a QMP monitor there, so the ``qemu`` hypervisor driver can
    describe it (its disk id is ``export_id``).
    """
    require_root()
    require_tool("qemu-storage-daemon")
    image, export = Path(image).resolve(), Path(export)
    export.touch()
    unmap = ",discard=unmap" if discard else ""
    monitor = [] if qmp is None else [
        "--chardev", f"socket,id=mon0,path={qmp},server=on,wait=off", "--monitor", "chardev=mon0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={image}{unmap}",
            "--blockdev", f"driver={fmt},node-name=fmt0,file=file0{unmap}",
            "--export", f"type=fuse,id={export_id},node-name=fmt0,mountpoint={export},writable=on",
            *monitor,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_for_fuse(export, proc, Path(qmp) if qmp is not None else None)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            subprocess.run(["fusermount3", "-u", str(export)], capture_output=True)


def _wait_for_fuse(
    export: Path, proc: subprocess.Popen[bytes], qmp: Path | None, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"qemu-storage-daemon exited {proc.returncode}: {err}")
        with open("/proc/self/mounts") as f:
            mounted_now = any(line.split()[1] == str(export) for line in f)
        if mounted_now and (qmp is None or qmp.exists()):
            return
        time.sleep(0.05)
    raise AssertionError(f"FUSE export {export} did not appear within {timeout}s")
