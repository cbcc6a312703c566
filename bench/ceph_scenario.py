"""The RBD end-to-end scenario in a real guest (issue 18), shared by
``tests/ceph/test_rbd_guest.py`` and ``bench/ceph_bench.py``: a TCG guest of
:mod:`vmreclaim.testing.guest` whose data disk is an RBD image held by QEMU's own rbd
driver runs the guest workload of ``guest_workload.py`` (files written while a checker
verifies its own, then deleted), and ``rbd du`` tells what RADOS gave back."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmreclaim.core.sparsify import sparsify_image
from vmreclaim.testing import run
from vmreclaim.testing.ceph import CephCluster
from vmreclaim.testing.guest import GuestDisk, GuestKit, GuestSpec, QemuGuest, make_ext4_image

#: The guest side (the same workload as the file-image scenario of guest_scenario.py).
WORKLOAD = Path(__file__).resolve().parent / "guest_workload.py"


@dataclass
class RbdGuestRun:
    """What :func:`rbd_guest_scenario` measured (bytes as ``rbd du`` counts them)."""

    mode: str
    deleted_bytes: int
    du_before: int
    du_after: int
    #: Seconds from the guest's sync after the deletions to ``rbd du`` showing 99 % of
    #: them freed; ``None`` if that did not happen within the bound.
    latency_seconds: float | None
    checker: dict[str, Any]
    guest_status: int | None
    fsck_clean: bool
    sparsify_seconds: float | None = None
    #: CPU seconds the cluster's daemons spent during the whole run (guest and reclaim).
    cluster_cpu_seconds: float = 0.0

    @property
    def freed_bytes(self) -> int:
        return self.du_before - self.du_after

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "freed_bytes": self.freed_bytes}


def rbd_guest_scenario(
    kit: GuestKit,
    cluster: CephCluster,
    workdir: Path,
    *,
    mode: str = "fstrim",
    n_files: int = 6,
    file_mib: int = 16,
    disk_mib: int = 256,
    object_size: str = "1M",
    target: float = 0.99,
    bound_seconds: float = 60.0,
) -> RbdGuestRun:
    """A TCG guest (:mod:`vmreclaim.testing.guest`) whose data disk is an RBD image held
    by QEMU's own rbd driver: an ext4 (made locally, imported with ``qemu-img``), the
    guest workload writes files while a checker rewrites and verifies its own, deletes
    them, and the deleted bytes' objects are watched with ``rbd du``.

    ``mode``: ``fstrim`` (disk with discard=unmap, one ``fstrim`` in the guest after the
    deletion) or ``sparsify`` (discard=ignore; after the guest has shut down,
    ``vmreclaim image sparsify rbd:...`` reads the filesystem through librbd). The
    image is exported afterwards and checked with ``e2fsck -fn``.
    """
    if mode not in ("fstrim", "sparsify"):
        raise ValueError(f"mode {mode!r} is not fstrim or sparsify")
    workdir.mkdir(parents=True, exist_ok=True)
    cpu_before = cluster.cpu_seconds()
    name = f"guest-{mode}-{uuid.uuid4().hex[:6]}"
    local = make_ext4_image(workdir / "fs.raw", disk_mib << 20, "raw")
    cluster.rbd("create", "--size", f"{disk_mib}M", "--object-size", object_size, f"{cluster.pool}/{name}")
    spec_name = cluster.spec(name)
    try:
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(local), spec_name], timeout=300)
        local.unlink()
        fstrim = "--fstrim" if mode == "fstrim" else ""
        script = f"""
mkdir -p /mnt/d0
mount -t ext4 /dev/vda /mnt/d0 || exit 10
$PYTHON {WORKLOAD} /mnt/d0 /xfer {n_files} {file_mib} {fstrim}
rc=$?
umount /mnt/d0 || rc=11
exit $rc
"""
        disk = GuestDisk(Path(spec_name), "raw", "disk0", discard=mode == "fstrim")
        spec = GuestSpec(kit, workdir, script, disks=[disk])
        guest = QemuGuest(spec)
        try:
            guest.start()
            guest.wait_for("checker-ready", timeout=180)
            guest.signal("go")
            guest.wait_for("written", timeout=600)
            before = cluster.du(name)
            guest.signal("delete")
            deleted = json.loads(guest.wait_for("deleted", timeout=600))
            synced_at = time.monotonic() - float(deleted.get("trim_seconds") or 0.0)
            latency = None
            if mode == "fstrim":
                while time.monotonic() - synced_at < bound_seconds:
                    if before - cluster.du(name) >= target * deleted["bytes"]:
                        latency = time.monotonic() - synced_at
                        break
                    time.sleep(0.2)
            guest.signal("stop")
            checker = json.loads(guest.wait_for("checker", timeout=300))
            status = guest.wait(300).returncode
        finally:
            guest.kill()
        sparsify_seconds = None
        if mode == "sparsify":
            started = time.monotonic()
            sparsify_image(spec_name)
            sparsify_seconds = time.monotonic() - started
        after = cluster.du(name)
        export = workdir / "export.raw"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", spec_name, str(export)], timeout=300)
        fsck = subprocess.run(["e2fsck", "-fn", str(export)], capture_output=True, timeout=300)
        export.unlink()
        return RbdGuestRun(
            mode, int(deleted["bytes"]), before, after, latency, checker, status, fsck.returncode == 0,
            sparsify_seconds, cluster.cpu_seconds() - cpu_before,
        )
    finally:
        subprocess.run(["rbd", "--conf", str(cluster.conf), "rm", f"{cluster.pool}/{name}"],
                       capture_output=True, check=False)
