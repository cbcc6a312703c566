"""A guest writes a qcow2 header into the first sector of its own raw disk, naming the
next VM's image as its external data file or as its backing file (issue 11 item 1).

Nothing that writes may take a format, a backing file or a data file from such bytes:
the writing commands on a probed image refuse (exit 4) and say how to name the format,
the static driver refuses ``format: auto`` at config time, and with the format named
(``raw``) every punch stays inside the disk itself. Each test checks the neighbour's
bytes, allocation and mtime: the attack's target.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from formats.imagetools import MiB, cli, qemu_img_create, qemu_io, sh
from vmreclaim.core.config import HostConfig, load_config
from vmreclaim.core.errors import UnsupportedImageError
from vmreclaim.core.opening import open_image
from vmreclaim.host.daemon import HostDaemon
from vmreclaim.testing import require_tool
from vmreclaim.testing.host import AgentPeer, host_config, static_vm

pytestmark = pytest.mark.qemu

SIZE = 16 * MiB


@dataclass(frozen=True)
class FileState:
    digest: str
    allocated: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileState:
        st = os.stat(path)
        return cls(hashlib.sha256(path.read_bytes()).hexdigest(), st.st_blocks * 512, st.st_mtime_ns)


def _ext_disk(path: Path, tmp: Path, seed: int) -> Path:
    """A raw disk holding an ext4 filesystem with a deleted file: its free blocks still
    hold data, so a punch of them changes the file's bytes (and its mtime)."""
    require_tool("mkfs.ext4", "debugfs")
    src = tmp / f"src{seed}"
    src.mkdir()
    (src / "keep").write_bytes(os.urandom(2 * MiB))
    (src / "gone").write_bytes(os.urandom(4 * MiB))
    with open(path, "wb") as f:
        f.truncate(SIZE)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", src, path)
    sh("debugfs", "-w", "-R", "rm /gone", path)
    return path


def _plant(victim: Path, forged: Path) -> None:
    """Write ``forged`` (a small qcow2 file) over the start of the raw disk ``victim``,
    as a guest writing to sector 0 of its own disk would."""
    data = forged.read_bytes()
    with open(victim, "r+b") as f:
        f.write(data)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    require_tool("qemu-img", "qemu-io")
    folder = tmp_path / "images"
    folder.mkdir()
    _ext_disk(folder / "vm1.img", tmp_path, 1)
    _ext_disk(folder / "vm2.img", tmp_path, 2)
    return folder


def _forge(tmp_path: Path, kind: str) -> Path:
    """A qcow2 header (with its tables) naming ``vm2.img`` — relative, so that it
    resolves next to the victim — as external data file or backing file."""
    forge = tmp_path / "forge"
    forge.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "images" / "vm2.img", forge / "vm2.img")  # a stand-in, same size
    hdr = forge / f"{kind}.qcow2"
    cwd = os.getcwd()
    os.chdir(forge)  # the header keeps the relative name "vm2.img"
    try:
        if kind == "data":
            qemu_img_create(Path(hdr.name), SIZE, data_file="vm2.img", data_file_raw=True,
                            preallocation="metadata")  # fmt: skip
        else:
            qemu_img_create(Path(hdr.name), SIZE, backing="vm2.img", backing_fmt="raw")
            qemu_io(Path(hdr.name), "write -P 7 8M 1M")  # some clusters of its own
    finally:
        os.chdir(cwd)
    return hdr


@pytest.fixture(params=["data", "backing"])
def planted(request: pytest.FixtureRequest, folder: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    victim, neighbour = folder / "vm1.img", folder / "vm2.img"
    _plant(victim, _forge(tmp_path, request.param))
    assert sh("qemu-img", "info", victim).stdout.count("file format: qcow2") == 1  # QEMU probes it so
    return victim, neighbour, request.param


WRITING = {
    "reclaim": ["image", "reclaim", "--range", f"0:{SIZE}"],
    "reclaim-deep": ["image", "reclaim", "--deep", "--range", f"0:{SIZE}"],
    "sparsify": ["image", "sparsify"],
}


@pytest.mark.parametrize("command", list(WRITING))
def test_a_writing_command_on_a_probed_image_follows_no_named_file(
    capsys: Any, planted: tuple[Path, Path, str], command: str
) -> None:
    victim, neighbour, kind = planted
    before = {p: FileState.of(p) for p in (victim, neighbour)}
    args = WRITING[command]
    code, _, err = cli(capsys, *args[:2], str(victim), *args[2:], "--json")
    assert code == 4, err
    assert "detected from the image's own bytes" in err and "--format raw" in err
    assert ("data file" if kind == "data" else "backing file") in err
    assert {p: FileState.of(p) for p in (victim, neighbour)} == before


def test_reading_commands_may_still_probe(capsys: Any, planted: tuple[Path, Path, str]) -> None:
    victim, neighbour, kind = planted
    code, doc, err = cli(capsys, "image", "info", str(victim), "--json")
    assert code == 0, err
    assert doc["format"] == "qcow2"
    if kind == "backing":
        assert doc["backing"] == [str(neighbour)]
    code, _, err = cli(capsys, "image", "map", str(victim), "--json")
    assert code == 0, err


def test_the_core_opener_refuses_for_any_caller_that_may_write(planted: tuple[Path, Path, str]) -> None:
    """The default of :func:`open_image` is the safe one: the host daemon (given
    ``auto`` by a third-party hypervisor driver) and sparsify call it without a flag."""
    victim, _, _ = planted
    with pytest.raises(UnsupportedImageError, match="detected from the image's own bytes"):
        open_image(victim)
    with pytest.raises(UnsupportedImageError):
        open_image(victim, "auto", writing=True)


@pytest.mark.parametrize("command", list(WRITING))
def test_with_format_raw_only_the_disk_itself_is_punched(
    capsys: Any, planted: tuple[Path, Path, str], command: str
) -> None:
    victim, neighbour, _ = planted
    theirs = FileState.of(neighbour)
    args = WRITING[command]
    if command == "reclaim-deep":
        code, _, err = cli(capsys, *args[:2], str(victim), *args[2:], "--format", "raw", "--json")
        assert code == 4 and "no deep reclaim" in err  # raw has none; refused, not ignored
        assert FileState.of(neighbour) == theirs
        return
    mine = FileState.of(victim)
    code, doc, err = cli(capsys, *args[:2], str(victim), *args[2:], "--format", "raw", "--json")
    if command == "sparsify":
        # The planted header overwrote the start of vm1's filesystem (its superblock
        # among it): refused as damaged, or read — either way only vm1 could change.
        assert code in (0, 4), err
    else:
        assert code == 0, err
        assert doc["punched_bytes"] > 0
        assert FileState.of(victim).allocated < mine.allocated
    assert FileState.of(neighbour) == theirs


def test_static_config_refuses_auto_and_a_missing_format(tmp_path: Path, capsys: Any) -> None:
    path = host_config(
        tmp_path / "host.yaml",
        [
            static_vm(
                "vm1",
                tmp_path / "vm1.sock",
                [{"id": "disk0", "path": tmp_path / "vm1.img", "format": "auto"}],
            ),
            static_vm("vm2", tmp_path / "vm2.sock", [{"id": "disk0", "path": tmp_path / "vm2.img"}]),
        ],
        database=tmp_path / "db.sqlite",
        status_socket=tmp_path / "status.sock",
    )
    code, _, err = cli(capsys, "config", "check", str(path))
    assert code == 2
    lines = err.strip().removeprefix("vmreclaim: error: ").splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"{path}:") and "hypervisor.vms.0.disks.0.format: " in lines[0]
    assert "'auto' is refused" in lines[0] and "name the format" in lines[0]
    assert "hypervisor.vms.1.disks.0.format: missing required key" in lines[1]


def test_the_daemon_with_a_named_format_punches_only_its_own_disk(
    tmp_path: Path, planted: tuple[Path, Path, str]
) -> None:
    """A host daemon started after the header was planted, a record from vm1 covering
    its whole disk: the neighbour (vm2's image, also configured) is untouched."""
    victim, neighbour, _ = planted
    theirs = FileState.of(neighbour)
    mine = FileState.of(victim)
    vms = [
        static_vm("vm1", tmp_path / "vm1.sock", [{"id": "disk0", "path": victim, "format": "raw"}]),
        static_vm("vm2", tmp_path / "vm2.sock", [{"id": "disk0", "path": neighbour, "format": "raw"}]),
    ]
    path = host_config(
        tmp_path / "host.yaml",
        vms,
        database=tmp_path / "db.sqlite",
        status_socket=tmp_path / "status.sock",
        policy={"driver": "always"},
        reclaim={"tick_seconds": 0.2, "retry_max_seconds": 1},
    )
    config = load_config(path, HostConfig)

    async def main() -> None:
        daemon = HostDaemon(config)
        await daemon.start()
        try:
            async with AgentPeer(tmp_path / "vm1.sock") as peer:
                seq = await peer.send_record([(0, SIZE)])
                await peer.wait_answered(seq)
                rt = daemon.disks["vm1/disk0"]
                deadline = asyncio.get_running_loop().time() + 30
                while rt.totals.reclaims < 1:
                    assert asyncio.get_running_loop().time() < deadline, "no reclaim within 30 s"
                    await asyncio.sleep(0.05)
        finally:
            await daemon.shutdown()

    asyncio.run(main())
    assert FileState.of(neighbour) == theirs
    assert FileState.of(victim).allocated < mine.allocated  # the punch did happen, in vm1
