"""The end-to-end scenario in a real guest: a workload writes and deletes files on a
data disk while the host gives the space back, one way or another (vmreclaim's agent
and daemon, ``fstrim``, ``mount -o discard``), and what it took is measured.

Run by ``bench/guest_bench.py`` (the numbers of docs/benchmarks.md) and by
``tests/guest/test_end_to_end.py`` (the assertions). The guest comes from
:mod:`vmreclaim.testing.guest`; the guest side of the scenario is ``guest_workload.py``
next to this file.
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmreclaim.testing.guest import (
    CHANNEL_NAME,
    Guest,
    GuestDisk,
    GuestKit,
    GuestPort,
    GuestResult,
    GuestSpec,
    LibvirtGuest,
    QemuGuest,
    allocated_bytes,
    make_ext4_image,
)

if TYPE_CHECKING:
    from vmreclaim.testing.host import HostProcess


#: The guest side of the scenario, run by the guest's Python (it sees the host's root).
WORKLOAD = Path(__file__).resolve().parent / "guest_workload.py"
#: How the guest gives space back: vmreclaim's agent and host daemon, one ``fstrim``
#: after the workload, or ``mount -o discard`` (the last two need discard=unmap).
MODES = ("vmreclaim", "fstrim", "discard-mount")
MiB = 1024 * 1024


@dataclass
class ScenarioResult:
    """What one run of the scenario measured (bytes, seconds)."""

    mode: str
    format: str
    backend: str
    image: Path
    deleted_bytes: int
    allocated_before: int
    allocated_after: int
    #: Seconds from the guest's ``sync`` after the deletions to the image giving back
    #: ``target`` of them; ``None`` if it never did within the bound.
    latency_seconds: float | None
    write_seconds: float
    delete_seconds: float
    trim_seconds: float | None
    checker: dict[str, object]
    guest: GuestResult
    host_log: str = ""

    @property
    def freed_bytes(self) -> int:
        return self.allocated_before - self.allocated_after


def run_scenario(
    kit: GuestKit,
    workdir: Path,
    *,
    fmt: str = "qcow2",
    backend: str = "qemu",
    mode: str = "vmreclaim",
    n_files: int = 6,
    file_mib: int = 16,
    disk_mib: int = 256,
    target: float = 0.99,
    bound_seconds: float = 90.0,
    discard: bool | None = None,
    libvirt_uri: str = "qemu:///system",
    checker_interval: float = 0.05,
    settle_seconds: float = 0.0,
    churn_rounds: int = 0,
) -> ScenarioResult:
    """Boot a guest with one ext4 data disk of ``fmt``, write ``n_files`` files of
    ``file_mib`` MiB while a checker process rewrites and verifies files of its own,
    delete them, and measure how soon and how much the image file shrinks.

    ``mode`` is ``vmreclaim`` (the checkout's agent in the guest, ``vmreclaim host``
    with the ``backend`` hypervisor driver on the host), ``fstrim`` or
    ``discard-mount``. ``discard`` (default: on for qcow2 and the two guest-side
    modes) sets the disk's discard=unmap. Waiting stops once ``target`` of the deleted
    bytes are freed or after ``bound_seconds``. ``churn_rounds`` short-lived 32 MiB files
    are written, synced and deleted at once before the victims are deleted: the image
    gives the victims back only if the churn's space came back as well.
    """

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if backend not in ("qemu", "libvirt"):
        raise ValueError(f"backend {backend!r} is not qemu or libvirt")
    workdir.mkdir(parents=True, exist_ok=True)
    suffix = {"qcow2": "qcow2", "raw": "raw", "vpc": "vhd"}[fmt]
    image = make_ext4_image(workdir / f"disk0.{suffix}", disk_mib * MiB, fmt)
    if discard is None:
        discard = mode != "vmreclaim" or fmt == "qcow2"
    port = GuestPort(workdir / "channel.sock")
    mount_opts = "-o discard" if mode == "discard-mount" else ""
    fstrim_flag = "--fstrim" if mode == "fstrim" else ""
    agent = mode == "vmreclaim"
    script = f"""
mkdir -p /mnt/d0 /var/lib/vmreclaim-agent
mount -t ext4 {mount_opts} /dev/vda /mnt/d0 || exit 10
{"$PYTHON -m vmreclaim agent --config /xfer/agent.yaml > /xfer/agent.log 2>&1 & AGENT=$!" if agent else ""}
$PYTHON {WORKLOAD} /mnt/d0 /xfer {n_files} {file_mib} {fstrim_flag} --churn {churn_rounds}
rc=$?
{'kill -TERM "$AGENT"; wait "$AGENT" || echo "agent exited $?"' if agent else ""}
umount /mnt/d0 || rc=11
exit $rc
"""
    spec = GuestSpec(
        kit,
        workdir,
        script,
        disks=[GuestDisk(image, fmt, "disk0", discard)],
        ports=[port] if agent else [],
        env={"CHECKER_INTERVAL": str(checker_interval)},
    )
    name = f"vmr-e2e-{fmt}-{uuidlib.uuid4().hex[:8]}"
    guest: Guest
    conn = None
    if backend == "libvirt":
        import libvirt

        conn = libvirt.open(libvirt_uri)
        guest = LibvirtGuest(spec, conn, name)
    else:
        guest = QemuGuest(spec)
    host = None
    try:
        guest.start()
        if agent:
            (spec.xfer / "agent.yaml").write_text(
                f"transport: {{driver: virtio-serial, name: {CHANNEL_NAME}}}\n"
                "filesystems: [{mount: /mnt/d0, disk: disk0}]\n"
                "spool: /var/lib/vmreclaim-agent/spool\n"
                "report_existing_free_space: false\n"
            )
            host = _start_host(workdir, backend, name, guest, libvirt_uri)
            # "connected" alone is the host's end of the port; the agent has spoken (and
            # taken its baseline of free space) once its hello named it.
            host.wait_for(
                lambda doc: any(
                    (vm.get("agent") or {}).get("connected") and (vm.get("agent") or {}).get("agent")
                    for vm in doc["vms"]
                ),
                timeout=120,
                what="the guest agent's hello",
            )
        guest.wait_for("checker-ready", timeout=120)
        guest.signal("go")
        written = json.loads(guest.wait_for("written", timeout=300))
        before = allocated_bytes(image)
        guest.signal("delete")
        deleted = json.loads(guest.wait_for("deleted", timeout=300))
        # Counted from the end of the deletions' sync: an fstrim run after it is part of
        # the wait (the guest reports how long it took).
        synced_at = time.monotonic() - float(deleted.get("trim_seconds") or 0.0)
        goal = target * deleted["bytes"]
        latency = None
        while time.monotonic() - synced_at < bound_seconds:
            if before - allocated_bytes(image) >= goal:
                latency = time.monotonic() - synced_at
                break
            time.sleep(0.05)
        # Bytes freed are read ``settle_seconds`` later (or at the bound): what is
        # still given back after the goal counts too.
        time.sleep(settle_seconds if latency is not None else 0.0)
        after = allocated_bytes(image)
        guest.signal("stop")
        checker = json.loads(guest.wait_for("checker", timeout=120))
        result = guest.wait(120)
        return ScenarioResult(
            mode=mode,
            format=fmt,
            backend=backend if agent else "-",
            image=image,
            deleted_bytes=int(deleted["bytes"]),
            allocated_before=before,
            allocated_after=after,
            latency_seconds=latency,
            write_seconds=float(written["seconds"]),
            delete_seconds=float(deleted["seconds"]),
            trim_seconds=deleted.get("trim_seconds"),
            checker=checker,
            guest=result,
            host_log=host.logs() if host is not None else "",
        )
    finally:
        guest.kill()
        if host is not None:
            host.stop()
        if conn is not None:
            conn.close()


def _start_host(workdir: Path, backend: str, name: str, guest: Guest, libvirt_uri: str) -> HostProcess:
    import yaml

    from vmreclaim.testing.host import HostProcess

    if backend == "libvirt":
        hypervisor: dict[str, object] = {"driver": "libvirt", "uri": libvirt_uri, "domains": [name]}
    else:
        assert isinstance(guest, QemuGuest)
        hypervisor = {"driver": "qemu", "vms": [{"name": name, "qmp": str(guest.qmp_socket)}]}
    config = workdir / "host.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "hypervisor": hypervisor,
                "policy": {"driver": "always"},
                "database": str(workdir / "host.sqlite"),
                "status_socket": str(workdir / "status.sock"),
                "reclaim": {"tick_seconds": 0.5, "rescan_seconds": 2},
                "log_level": "debug",
            },
            sort_keys=False,
        )
    )
    return HostProcess(config, log_path=workdir / "host.log").start()
