"""Damaged ext filesystems: every cross-check applies to every group, uninitialised ones
included, and any disagreement refuses before anything is punched (issue 11 item 2).

The damage is made the way fsck test suites make theirs: ``debugfs -w`` setting
descriptor and superblock fields (``set_bg``, ``set_super_value``), with and without
recomputing the descriptor checksum. The property: ``image sparsify`` either refuses
(exit 4, image unchanged) or leaves ``e2fsck -fn``'s findings and the content of every
file unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmreclaim.cli import main
from vmreclaim.testing import require_tool, run

from .disks import MIB, GuestDisk, delete, make_files, mkfs

BLOCK = 1024
EXAMPLES = int(os.environ.get("VMRECLAIM_ORACLE_EXAMPLES", min(settings.default.max_examples, 60)))
GROUPS = 4  # 32 MiB of 1 KiB blocks: 8192 blocks per group


def debugfs_w(img: Path, *requests: str) -> None:
    script = "\n".join(requests) + "\n"
    subprocess.run(["debugfs", "-w", "-f", "-", str(img)], input=script, capture_output=True, text=True,
                   check=True, timeout=60)  # fmt: skip


def fsck_findings(img: Path) -> str:
    proc = subprocess.run(
        ["e2fsck", "-fn", str(img)], capture_output=True, text=True, check=False, timeout=120
    )
    # The first line names the e2fsprogs version; the rest is what it found.
    return "\n".join(proc.stdout.splitlines()[1:]) + f"\nexit {proc.returncode}"


def contents(disk: GuestDisk, scratch: Path) -> dict[str, bytes]:
    """Every file as ``debugfs dump`` reads it from the (possibly damaged) image."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    script = "".join(f"dump {n} {scratch / n.strip('/').replace('/', '_')}\n" for n in disk.files)
    subprocess.run(["debugfs", "-f", "-", str(disk.path)], input=script, capture_output=True, text=True,
                   check=False, timeout=120)  # fmt: skip
    out = {}
    for name in disk.files:
        p = scratch / name.strip("/").replace("/", "_")
        out[name] = p.read_bytes() if p.exists() else b"<unreadable>"
    return out


def group_of_files(img: Path) -> list[int]:
    """Groups that hold file data (their descriptors count fewer free blocks than a
    fresh group would): the ones whose damage can lose data."""
    out = run(["dumpe2fs", str(img)])
    groups = []
    for line in out.splitlines():
        if g := re.match(r"^Group (\d+):", line):
            current = int(g.group(1))
        elif (m := re.match(r"^\s+(\d+) free blocks,", line)) and int(m.group(1)) < 7000:
            groups.append(current)
    return groups


_PRISTINE: dict[str, tuple[bytes, dict[str, bytes]]] = {}


def pristine(tmp: Path, kind: str) -> tuple[bytes, dict[str, bytes]]:
    """A filesystem with files in several groups, a third of them deleted (so free
    blocks hold old data a punch would change), cached per kind."""
    if kind not in _PRISTINE:
        require_tool("mkfs.ext4", "debugfs", "e2fsck", "dumpe2fs")
        src = tmp / f"src-{kind}"
        files = make_files(src, 40, seed=11, max_size=600 * 1024)
        img = tmp / f"pristine-{kind}.img"
        options = {
            "ext4": ["-O", "^flex_bg"],
            "ext4-flex": [],
            "ext4-crc16": ["-O", "^metadata_csum,uninit_bg"],
        }
        mkfs(img, GROUPS * 8 * MIB, src, "ext4", "-b", str(BLOCK), *options[kind])
        disk = GuestDisk(img, 0, BLOCK, dict(files))
        delete(disk, sorted(disk.files)[::3])
        _PRISTINE[kind] = (img.read_bytes(), disk.files)
    return _PRISTINE[kind]


def sparsify(img: Path) -> int:
    return main(["image", "sparsify", str(img), "--format", "raw", "--json"])


@pytest.fixture
def damaged(tmp_path: Path) -> GuestDisk:
    data, files = pristine(tmp_path.parent, "ext4")
    img = tmp_path / "fs.img"
    img.write_bytes(data)
    return GuestDisk(img, 0, BLOCK, dict(files))


def test_a_group_flagged_block_uninit_that_holds_files_is_refused(
    damaged: GuestDisk, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: BLOCK_UNINIT on a group whose blocks files own, the descriptor
    checksum made valid again. Taken as wholly free, its file blocks were punched."""
    used = group_of_files(damaged.path)
    target = next(g for g in used if g > 0)
    debugfs_w(damaged.path, f"set_bg {target} flags 2", f"set_bg {target} checksum calc")
    before = damaged.path.read_bytes()
    assert sparsify(damaged.path) == 4
    err = capsys.readouterr().err
    assert f"group {target} is flagged BLOCK_UNINIT" in err and "descriptor counts" in err, err
    assert damaged.path.read_bytes() == before


def test_superblock_total_that_disagrees_with_the_groups_is_refused(
    damaged: GuestDisk, capsys: pytest.CaptureFixture[str]
) -> None:
    debugfs_w(damaged.path, "ssv free_blocks_count 12345")
    before = damaged.path.read_bytes()
    assert sparsify(damaged.path) == 4
    assert "the superblock counts 12345 free blocks" in capsys.readouterr().err
    assert damaged.path.read_bytes() == before


def test_a_descriptor_count_below_its_bitmap_is_refused(
    damaged: GuestDisk, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fewer free blocks counted than the bitmap shows (the superblock total kept
    consistent with the descriptors): before, only the opposite refused."""
    out = run(["dumpe2fs", str(damaged.path)])
    total = int(re.search(r"^Free blocks:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    group0 = int(re.search(r"^\s+(\d+) free blocks,", out, re.M).group(1))  # type: ignore[union-attr]
    debugfs_w(
        damaged.path,
        "set_bg 0 free_blocks_count 1",
        "set_bg 0 checksum calc",
        f"ssv free_blocks_count {total - group0 + 1}",
    )
    before = damaged.path.read_bytes()
    assert sparsify(damaged.path) == 4
    err = capsys.readouterr().err
    assert "block bitmap of group 0" in err and "descriptor counts 1 " in err, err
    assert damaged.path.read_bytes() == before


def test_inode_uninit_with_inodes_in_use_is_refused(
    damaged: GuestDisk, capsys: pytest.CaptureFixture[str]
) -> None:
    debugfs_w(damaged.path, "set_bg 0 flags 1", "set_bg 0 checksum calc")
    before = damaged.path.read_bytes()
    assert sparsify(damaged.path) == 4
    assert "group 0 is flagged INODE_UNINIT" in capsys.readouterr().err
    assert damaged.path.read_bytes() == before


# -- the property ------------------------------------------------------------------------------

#: ``flags`` three times: an uninitialised flag on a used group is the damage that lost files.
FIELDS = [
    "flags",
    "flags",
    "flags",
    "free_blocks_count",
    "free_inodes_count",
    "itable_unused",
    "block_bitmap",
    "checksum",
]


@st.composite
def damage(draw: st.DrawFn) -> list[str]:
    requests = []
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["bg", "bg", "bg", "super"]))
        if what == "super":
            field = draw(st.sampled_from(["free_blocks_count", "free_inodes_count"]))
            requests.append(f"ssv {field} {draw(st.integers(0, GROUPS * 8192))}")
            continue
        group = draw(st.integers(0, GROUPS - 1))
        field = draw(st.sampled_from(FIELDS))
        if field == "flags":
            value = draw(st.integers(0, 7))
        elif field == "block_bitmap":
            value = draw(st.integers(1, GROUPS * 8192 - 1))
        elif field == "checksum":
            value = draw(st.integers(0, 0xFFFF))
        else:
            value = draw(st.integers(0, 8192))
        requests.append(f"set_bg {group} {field} {value}")
        if field != "checksum" and draw(st.booleans()):
            requests.append(f"set_bg {group} checksum calc")  # a consistent-looking descriptor
    return requests


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["ext4", "ext4-flex", "ext4-crc16"]), requests=damage())
def test_damaged_filesystems_are_refused_or_left_as_they_were(
    tmp_path_factory: pytest.TempPathFactory, kind: str, requests: list[str]
) -> None:
    tmp = tmp_path_factory.getbasetemp()
    data, files = pristine(tmp, kind)
    img = tmp / f"damaged-{kind}.img"
    img.write_bytes(data)
    disk = GuestDisk(img, 0, BLOCK, dict(files))
    debugfs_w(img, *requests)
    findings = fsck_findings(img)
    before_files = contents(disk, tmp / "before")
    before = img.read_bytes()
    code = sparsify(img)
    assert code in (0, 4), f"{requests}: exit {code}"
    if code == 4:
        assert img.read_bytes() == before, f"{requests}: refused but changed the image"
        return
    assert fsck_findings(img) == findings, f"{requests}: e2fsck -fn findings changed"
    after_files = contents(disk, tmp / "after")
    changed = [n for n in files if after_files[n] != before_files[n]]
    assert not changed, f"{requests}: files changed: {changed[:5]}"


def test_the_host_daemons_offline_reclaim_refuses_the_same_damage(damaged: GuestDisk, tmp_path: Path) -> None:
    """The daemon's offline mode reads free space with the same reader and rule
    (``core.sparsify.scan_free_space``): a record covering the whole disk from a VM
    that then stops, on the damaged filesystem — the attempt fails naming the group,
    nothing is punched."""
    import asyncio

    from vmreclaim.core.config import HostConfig, load_config
    from vmreclaim.host.daemon import HostDaemon
    from vmreclaim.testing.host import AgentPeer, host_config, static_vm

    target = next(g for g in group_of_files(damaged.path) if g > 0)
    debugfs_w(damaged.path, f"set_bg {target} flags 2", f"set_bg {target} checksum calc")
    before = damaged.path.read_bytes()
    size = len(before)
    channel = tmp_path / "vm1.sock"
    path = host_config(
        tmp_path / "host.yaml",
        [static_vm("vm1", channel, [{"id": "disk0", "path": damaged.path, "format": "raw"}])],
        database=tmp_path / "db.sqlite",
        status_socket=tmp_path / "status.sock",
        policy={"driver": "always"},
        reclaim={"tick_seconds": 0.1, "retry_max_seconds": 60},
    )

    async def main() -> None:
        daemon = HostDaemon(load_config(path, HostConfig))
        await daemon.start()
        try:
            peer = AgentPeer(channel, on_fence=lambda f: "shutting down")
            await peer.connect()
            seq = await peer.send_record([(0, size)])
            await peer.wait_answered(seq)
            await peer.close()
            rt = daemon.disks["vm1/disk0"]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while rt.last_attempt is None or rt.busy:
                assert loop.time() < deadline, "no offline attempt within 30 s"
                await asyncio.sleep(0.05)
            attempt = rt.last_attempt
            assert attempt.mode == "offline" and attempt.outcome == "failed", attempt
            assert f"group {target} is flagged BLOCK_UNINIT" in attempt.detail, attempt.detail
            assert attempt.punched_bytes == 0
        finally:
            await daemon.shutdown()

    asyncio.run(main())
    assert damaged.path.read_bytes() == before
