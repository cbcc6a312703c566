"""``vmreclaim image sparsify rbd:...`` end to end: an ext4 with files, some deleted,
imported into RBD; sparsify reads the filesystem through librbd and discards its free
objects. Oracles: ``rbd du`` (what RADOS holds), ``e2fsck -fn`` and ``debugfs dump`` on
an export of the image afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.ceph.conftest import cli, cli_json
from tests.sparsify.disks import (
    GuestDisk,
    assert_files_intact,
    assert_fsck_clean,
    delete,
    dumpe2fs_free,
    make_files,
    mkfs,
)
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing.ceph import CephCluster

MIB = 1 << 20
OBJECT = 256 * 1024


def build(cluster: CephCluster, tmp_path: Path, name: str) -> tuple[GuestDisk, int, RangeSet]:
    """A 256 MiB ext4 of 300 files, half of them (by count) deleted, imported into the
    pool as ``name`` (256 KiB objects); the disk, the deleted files' bytes, and the
    objects that held only free blocks after the deletion (``dumpe2fs``) and existed:
    what a perfect sparsify frees."""
    files = make_files(tmp_path / "src", 300, seed=18, max_size=1 << 20)
    local = tmp_path / "fs.raw"
    mkfs(local, 256 * MIB, tmp_path / "src", "ext4", "-b", "4096")
    disk = GuestDisk(local, 0, 4096, dict(files))
    gone = sorted(files)[: len(files) // 2] + sorted(files)[len(files) // 2 :: 3]
    deleted = sum(len(files[n]) for n in gone)
    delete(disk, gone)
    # qemu-img writes every allocated byte, deleted files' blocks included: the image in
    # RADOS then holds the dead data, as a guest's disk does.
    cluster.rbd("create", "--size", "256M", "--object-size", "256K", f"{cluster.pool}/{name}")
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(local), cluster.spec(name)],
                   check=True, timeout=300)
    free = dumpe2fs_free(str(local), 4096).align_inward(OBJECT)
    doc = json.loads(cluster.rbd("diff", "--whole-object", "--format", "json", f"{cluster.pool}/{name}"))
    present = RangeSet([int(e["offset"]) for e in doc], [int(e["offset"]) + int(e["length"]) for e in doc])
    return disk, deleted, free.intersect(present)


def export(cluster: CephCluster, name: str, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", cluster.spec(name), str(dest)],
                   check=True, timeout=300)
    return dest


@pytest.mark.qemu
def test_sparsify_frees_deleted_files_objects_and_keeps_the_filesystem(
    cluster: CephCluster, tmp_path: Path, new_image: Callable[..., str]
) -> None:
    name = new_image("4M")  # registered for removal; recreated below with our layout
    cluster.rbd("rm", f"{cluster.pool}/{name}")
    disk, deleted, freeable = build(cluster, tmp_path, name)
    spec = cluster.spec(name)
    before = cluster.du(name)
    assert before >= deleted

    dry = cli_json("image", "sparsify", spec, "--dry-run")
    assert dry["freed_bytes"] == 0 and cluster.du(name) == before
    started = time.monotonic()
    doc = cli_json("image", "sparsify", spec)
    seconds = time.monotonic() - started
    after = cluster.du(name)
    [fs] = doc["filesystems"]
    assert fs["type"] == "ext4" and fs["block_size"] == 4096
    assert doc["freed_bytes"] == before - after
    # Every object that held only free blocks is gone (>= 99 %; objects that share a
    # block with live data stay, their tails are truncated but rbd du counts objects).
    assert freeable.total >= deleted // 2
    assert before - after >= 0.99 * freeable.total, (before, after, freeable.total)
    print(f"rbd sparsify: du {before} -> {after} bytes (deleted {deleted}, freeable objects "
          f"{freeable.total}) in {seconds:.2f} s")

    out = export(cluster, name, tmp_path / "after.raw")
    check = GuestDisk(out, 0, 4096, disk.files)
    assert_fsck_clean(check)
    assert_files_intact(check, tmp_path / "dump")


@pytest.mark.qemu
@pytest.mark.slow
def test_virt_sparsify_on_the_same_rbd_image(cluster: CephCluster, tmp_path: Path) -> None:
    """The reference tool on the same kind of RBD image, for docs/benchmarks.md.

    ``virt-sparsify`` cannot open ``rbd:`` names (libguestfs 1.48 looks for a file of
    that name: "No such file or directory"), so the image is served to it as a file by
    ``qemu-storage-daemon`` (QEMU's rbd driver, discard=unmap, a FUSE export): its
    discards reach RADOS through librbd as a VM's would.
    """
    if shutil.which("virt-sparsify") is None or shutil.which("qemu-storage-daemon") is None:
        pytest.skip("needs virt-sparsify (scripts/setup.sh --bench) and qemu-storage-daemon")
    name = "virtsparsify"
    _, deleted, freeable = build(cluster, tmp_path, name)
    export = tmp_path / "rbd.fuse"
    export.touch()
    qsd = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=rbd,node-name=r0,pool={cluster.pool},image={name},conf={cluster.conf},"
                       "discard=unmap",
         "--blockdev", "driver=raw,node-name=f0,file=r0,discard=unmap",
         "--export", f"type=fuse,id=e0,node-name=f0,mountpoint={export},writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while export.stat().st_size == 0:
            assert qsd.poll() is None and time.monotonic() < deadline, "qemu-storage-daemon did not export"
            time.sleep(0.1)
        before = cluster.du(name)
        env = {**os.environ, "LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
        started = time.monotonic()
        done = subprocess.run(
            ["virt-sparsify", "--in-place", "--format", "raw", str(export)],
            capture_output=True, text=True, env=env, timeout=900, check=False,
        )
        seconds = time.monotonic() - started
        assert done.returncode == 0, done.stderr[-2000:]
        after = cluster.du(name)
        print(f"virt-sparsify --in-place via FUSE: du {before} -> {after} bytes (deleted {deleted}, "
              f"freeable objects {freeable.total}) in {seconds:.2f} s")
        assert before - after >= 0.9 * freeable.total
    finally:
        qsd.terminate()
        qsd.wait(timeout=60)
        cluster.rbd("rm", f"{cluster.pool}/{name}")


def test_sparsify_of_a_busy_image_is_refused(cluster: CephCluster, new_image: Callable[..., str]) -> None:
    rados = pytest.importorskip("rados")
    rbd = pytest.importorskip("rbd")
    name = new_image("4M", "64K")
    with (
        rados.Rados(conffile=str(cluster.conf)) as client,
        client.open_ioctx(cluster.pool) as ioctx,
        rbd.Image(ioctx, name),
    ):
        done = cli("image", "sparsify", cluster.spec(name))
        assert done.returncode == 3 and "busy" in done.stderr, done.stderr
        # A dry run of a busy image is a read-only estimate, labelled as one (issue 13).
        done = cli("image", "sparsify", cluster.spec(name), "--dry-run", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["estimate"] is True
