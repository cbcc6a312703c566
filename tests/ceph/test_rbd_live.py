"""Live: a running QEMU holds an RBD disk with librbd's exclusive lock. vmreclaim never
opens it as a second writer (offline commands refuse, exit 3); a reclaim goes through
the hypervisor instead — ``Hypervisor.discard`` of the ``qemu`` driver, a discard on
QEMU's own block node (HMP ``qemu-io`` on the device) — and RADOS frees the objects."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.ceph.conftest import cli, qemu_io
from vmreclaim.core import loader
from vmreclaim.core.hypervisors import Hypervisor
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing.ceph import CephCluster

pytestmark = pytest.mark.qemu
OBJ = 64 * 1024


def test_discard_through_qemus_own_node_frees_objects_while_qemu_holds_the_lock(
    cluster: CephCluster, new_image: Callable[..., str], tmp_path: Path
) -> None:
    import subprocess

    name = new_image("4M", "64K")
    spec = cluster.spec(name)
    qemu_io(spec, "write -P 0xab 0 1M")
    qmp = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
         "-drive", f"file={spec},format=raw,if=none,id=d0,discard=unmap",
         "-device", "virtio-blk-pci,drive=d0,serial=disk0",
         "-qmp", f"unix:{qmp},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not qmp.exists():
            assert qemu.poll() is None and time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.1)
        driver_class = loader.driver_class("hypervisors", "qemu", Hypervisor)
        hypervisor = driver_class(driver_class.Options(vms=[{"name": "vm1", "qmp": str(qmp)}]))  # type: ignore[call-arg]
        try:
            [vm] = hypervisor.vms()
            [disk] = vm.disks
            assert disk.id == "disk0" and disk.passes_discards
            # Offline tools refuse: QEMU watches the image.
            refused = cli("image", "reclaim", spec, "--range", "0:1048576")
            assert refused.returncode == 3 and "watches it" in refused.stderr
            before = cluster.du(name)
            hypervisor.discard(vm.identity, disk, RangeSet([OBJ], [4 * OBJ]))
            assert before - cluster.du(name) == 3 * OBJ
            # QEMU still holds the image: no client took its lock away.
            assert qemu.poll() is None
            status = cluster.rbd("status", "--format", "json", f"{cluster.pool}/{name}")
            assert '"watchers": []' not in status
        finally:
            hypervisor.close()
    finally:
        qemu.kill()
        qemu.wait(timeout=30)
    qemu_io(spec, "read -P 0xab 0 64K", "read -P 0 64K 192K", "read -P 0xab 256K 768K")
