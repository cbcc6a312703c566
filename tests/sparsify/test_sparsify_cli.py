"""The ``image sparsify`` command: other filesystems listed as skipped, busy images,
dry runs, and the progress bar on a terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from vmreclaim.core import loader
from vmreclaim.testing import qemu_io_holding, require_tool, run

from .disks import MIB, GuestDisk, allocated, delete, make_files, mkfs, place, sfdisk_json, write_table

pytestmark = pytest.mark.qemu

GPT_TYPES = {
    "esp": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "linux": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    "swap": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
    "ms": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmreclaim", "image", "sparsify", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def ext4_disk(tmp_path: Path) -> GuestDisk:
    """A whole-disk ext4 with half its files deleted (its blocks still hold their data)."""
    files = make_files(tmp_path / "src", 40, seed=11)
    img = tmp_path / "disk.img"
    mkfs(img, 48 * MIB, tmp_path / "src", "ext4")
    disk = GuestDisk(img, 0, 1024, files)
    delete(disk, sorted(files)[::2])
    return disk


def test_other_filesystems_are_listed_as_skipped(tmp_path: Path) -> None:
    require_tool("sfdisk", "mkfs.xfs", "mkfs.btrfs", "mkfs.vfat", "mkfs.ntfs", "mkswap")
    sizes = {"esp": 40, "linux": 48, "xfs": 320, "btrfs": 128, "ms": 40, "swap": 16, "luks": 8}
    table = ["label: gpt"]
    for name, mib in sizes.items():
        kind = GPT_TYPES.get(name, GPT_TYPES["linux"])
        table.append(f"size={mib}MiB, type={kind}, name={name}")
    disk = tmp_path / "disk.img"
    write_table(disk, 640 * MIB, "\n".join(table) + "\n")
    parts = {p["name"]: p for p in sfdisk_json(disk)}
    make_files(tmp_path / "src", 10, seed=2)

    def build(name: str, cmd: list[str]) -> None:
        part = parts[name]
        fs = tmp_path / f"{name}.img"
        with open(fs, "wb") as f:
            f.truncate(int(part["size"]) * 512)  # type: ignore[call-overload]
        run([*cmd, str(fs)])
        place(fs, disk, int(part["start"]) * 512)  # type: ignore[call-overload]

    build("esp", ["mkfs.vfat", "-n", "EFI"])
    build("linux", ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(tmp_path / "src")])
    build("xfs", ["mkfs.xfs", "-q", "-f"])
    build("btrfs", ["mkfs.btrfs", "-q", "-f"])
    build("ms", ["mkfs.ntfs", "-q", "-F", "-Q"])
    build("swap", ["mkswap", "-L", "swp"])
    luks = tmp_path / "luks.img"
    luks.write_bytes(b"LUKS\xba\xbe\x00\x02" + bytes(4096))
    place(luks, disk, int(parts["luks"]["start"]) * 512)  # type: ignore[call-overload]

    proc = cli(str(disk), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    by_number = {f["partition"]: f for f in doc["filesystems"]}
    assert [by_number[i]["type"] for i in range(1, 8)] == [
        "vfat",
        "ext4",
        "xfs",
        "btrfs",
        "ntfs",
        "swap",
        "crypto_LUKS2",
    ]
    assert by_number[2]["skipped"] is None and by_number[2]["free_bytes"] > 30 * MIB
    assert by_number[2]["label"] == "root"
    read = [n for n in (1, 3, 5) if by_number[n]["skipped"] is None]  # readers of issue 15
    assert all(by_number[n]["free_bytes"] > 30 * MIB for n in read)
    for number in sorted({1, 3, 4, 5, 6, 7} - set(read)):
        reason = by_number[number]["skipped"]
        assert reason and by_number[number]["type"].split("_")[0].lower() in reason.lower(), reason
        assert by_number[number]["free_bytes"] == 0
    assert by_number[3]["block_size"] == 4096 and by_number[6]["label"] == "swp"
    assert doc["free_bytes"] == sum(by_number[n]["free_bytes"] for n in (2, *read))

    # Human output names every skipped filesystem too.
    human = cli(str(disk), "--dry-run")
    assert human.returncode == 0
    for word in ("vfat", "xfs", "btrfs", "ntfs", "swap", "skipped"):  # read or skipped, all named
        assert word in human.stdout


def test_hibernated_swap_is_skipped_with_its_reason(tmp_path: Path) -> None:
    img = tmp_path / "swap.img"
    with open(img, "wb") as f:
        f.truncate(8 * MIB)
        f.seek(4096 - 10)
        f.write(b"S1SUSPEND\x00")
    proc = cli(str(img), "--json")
    assert proc.returncode == 0, proc.stderr
    [fs] = json.loads(proc.stdout)["filesystems"]
    assert fs["type"] == "swap" and "hibernation" in fs["skipped"]


def test_busy_image_is_refused_with_exit_3(ext4_disk: GuestDisk) -> None:
    """Punching a busy image is refused; a dry run gives an estimate, labelled as one."""
    before = ext4_disk.path.read_bytes(), allocated(ext4_disk.path)
    exact = json.loads(cli(str(ext4_disk.path), "--json", "--dry-run").stdout)
    assert exact["estimate"] is False
    with qemu_io_holding(ext4_disk.path, "raw"):
        proc = cli(str(ext4_disk.path), "--json")
        assert proc.returncode == 3, proc.stderr
        assert "busy" in proc.stderr and str(ext4_disk.path) in proc.stderr
        assert proc.stdout == ""
        proc = cli(str(ext4_disk.path), "--json", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["estimate"] is True and doc["dry_run"] is True and doc["freed_bytes"] == 0
        # The filesystem is quiet, so the estimate is the exact answer here.
        assert doc["free_bytes"] == exact["free_bytes"] and doc["punched_bytes"] == exact["punched_bytes"]
        human = cli(str(ext4_disk.path), "--dry-run")
        assert human.returncode == 0 and "ESTIMATE" in human.stdout
    assert (ext4_disk.path.read_bytes(), allocated(ext4_disk.path)) == before


def test_dry_run_changes_nothing_and_predicts_the_punch(ext4_disk: GuestDisk) -> None:
    img = ext4_disk.path
    before = img.read_bytes(), allocated(img), img.stat().st_mtime_ns
    dry = cli(str(img), "--json", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True and planned["freed_bytes"] == 0
    assert planned["punched_bytes"] > 2 * MIB
    assert (img.read_bytes(), allocated(img), img.stat().st_mtime_ns) == before
    real = json.loads(cli(str(img), "--json").stdout)
    assert real["dry_run"] is False
    assert real["punched_bytes"] == planned["punched_bytes"]
    assert real["free_bytes"] == planned["free_bytes"]
    assert real["freed_bytes"] == before[1] - allocated(img) > 0


def run_on_tty(*args: str) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; return its screen."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.environ["COLUMNS"] = "120"
        os.execv(sys.executable, [sys.executable, "-m", "vmreclaim", "image", "sparsify", *args])
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_not_with_json(ext4_disk: GuestDisk) -> None:
    code, screen = run_on_tty(str(ext4_disk.path), "--dry-run")
    assert code == 0, screen
    assert "whole disk: ext4 bitmaps" in screen and "━" in screen and "100%" in screen
    assert "would punch" in screen
    code, screen = run_on_tty(str(ext4_disk.path), "--dry-run", "--json")
    assert code == 0
    assert "bitmaps" not in screen
    assert json.loads(screen)["dry_run"] is True


def test_backing_file_is_never_written(tmp_path: Path, ext4_disk: GuestDisk) -> None:
    """An overlay whose guest data all lives in its backing file: nothing to punch in the
    overlay, and the backing file is read (to find the filesystem) but never written."""
    require_tool("qemu-img")
    if "qcow2" not in {d.name for d in loader.installed("formats") if d.error is None}:
        pytest.skip("no working qcow2 format driver installed (issue 4)")
    base = ext4_disk.path
    overlay = tmp_path / "overlay.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)])
    before = base.read_bytes(), allocated(base), base.stat().st_mtime_ns
    # Without --format the probed overlay may follow no backing file (issue 11 item 1).
    refused = cli(str(overlay), "--json")
    assert refused.returncode == 4 and "--format qcow2" in refused.stderr, refused.stderr
    proc = cli(str(overlay), "--format", "qcow2", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    [fs] = doc["filesystems"]
    assert fs["type"] == "ext4" and fs["free_bytes"] > 0
    assert doc["punched_bytes"] == 0
    assert {s["reason"] for s in doc["skipped"]} == {"unallocated"}
    assert (base.read_bytes(), allocated(base), base.stat().st_mtime_ns) == before
    run(["qemu-img", "check", "-q", str(overlay)])
