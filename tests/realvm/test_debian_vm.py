"""A real Debian 12 VM deployed as docs/deploy.md says, reclaiming its root filesystem
(issue 21): debootstrap image with its own kernel and systemd, root ext4 on /dev/vda1 of
a 4 GiB qcow2 with discard off, the agent installed offline into a venv, the domain
under the real libvirtd (TCG), ``vmreclaim libvirt enable``, the host daemon with the
``libvirt`` driver and the shipped ``examples/libvirt/*.yaml``.

Whether a deletion came back is measured exactly, not from the image's size: in the
guest, FIEMAP gives the file's blocks on /dev/vda1; ``qemu-img map`` turns those guest
bytes into offsets in the qcow2 file; ``SEEK_DATA``/``SEEK_HOLE`` on the qcow2 says how
many of those bytes the host filesystem still holds. Journal and log writes elsewhere
in the image do not blur the figure.

The tests run in file order on one VM (module fixture). Figures go to the JSON file
named by ``VMRECLAIM_REALVM_RESULTS`` (default: the test's tmp dir), for
docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmreclaim.core.punch import held_ranges
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing import require_root, require_tool
from vmreclaim.testing.debian_vm import DebianImage, GuestShell, build_image, build_wheelhouse, domain_xml
from vmreclaim.testing.host import HostProcess

pytestmark = [pytest.mark.realvm, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
URI = "qemu:///system"
BACK_WITHIN = 60.0
MiB = 1024 * 1024

#: Runs in the guest: ``python3 - PATH...`` prints the FIEMAP extents of every regular
#: file under the paths as JSON ``[[byte on the partition, length], ...]`` plus the
#: partition's first byte on the disk. FIEMAP_FLAG_SYNC flushes delayed allocation first.
FIEMAP_SCRIPT = r"""
import fcntl, json, os, struct, sys
FS_IOC_FIEMAP, SYNC, LAST, N = 0xC020660B, 1, 1, 256
def extents(path):
    out, start = [], 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            buf = bytearray(struct.pack("=QQLLLL", start, 2**64 - 1, SYNC, 0, N, 0) + bytes(56 * N))
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = struct.unpack_from("=L", buf, 20)[0]
            last = mapped == 0
            for i in range(mapped):
                ext = struct.unpack_from("=QQQQQLLLL", buf, 32 + 56 * i)
                logical, phys, length, flags = ext[0], ext[1], ext[2], ext[5]
                out.append([phys, length])
                start = logical + length
                last = last or bool(flags & LAST)
            if last:
                return out
    finally:
        os.close(fd)
found = []
for top in sys.argv[1:]:
    if os.path.isfile(top):
        found += extents(top)
    for d, _, files in os.walk(top):
        for f in files:
            found += extents(os.path.join(d, f))
part = int(open("/sys/class/block/vda1/start").read()) * 512
print(json.dumps({"partition_start": part, "extents": found}))
"""

#: A writer on the root filesystem: a 4 KiB write every 10 ms (no fsync: what blocks it
#: is the freeze, not the disk), the longest gap between two writes, until /run/writer.stop.
WRITER_SCRIPT = r"""
import os, time, json
fd = os.open("/var/tmp/writer.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
last, worst, n, slow = time.monotonic(), 0.0, 0, []
while not os.path.exists("/run/writer.stop"):
    os.write(fd, b"x" * 4096)
    n += 1
    if n % 2560 == 0:
        os.lseek(fd, 0, 0)
    now = time.monotonic()
    if now - last > 0.1:
        slow.append([time.time(), now - last])
    worst, last = max(worst, now - last), now
    time.sleep(0.01)
json.dump({"worst_gap_seconds": worst, "writes": n, "slow": slow}, open("/run/writer.result", "w"))
"""


@dataclass
class RealVM:
    name: str
    image: DebianImage
    disk: Path
    workdir: Path
    domain: Any
    shell: GuestShell
    host_config: Path
    host: HostProcess | None = None
    results: dict[str, Any] = field(default_factory=dict)

    def start_host(self) -> HostProcess:
        self.host = HostProcess(self.host_config, log_path=self.workdir / "host.log").start(timeout=60)
        return self.host

    def guest_ranges(self, *paths: str) -> RangeSet:
        out = self.shell.run(f"python3 - {' '.join(paths)} <<'EOF'\n{FIEMAP_SCRIPT}\nEOF")
        doc = json.loads(out)
        start = doc["partition_start"]
        return RangeSet.from_ranges((start + p, n) for p, n in doc["extents"])

    def host_ranges(self, guest: RangeSet) -> RangeSet:
        """Where ``guest`` bytes live in the qcow2 file (qemu-img map, read-shared)."""
        proc = subprocess.run(
            ["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(self.disk)],
            capture_output=True,
            text=True,
            check=True,
        )
        pieces: list[tuple[int, int]] = []
        for entry in json.loads(proc.stdout):
            if not entry.get("data") or entry.get("offset") is None:
                continue
            mapped = RangeSet.from_ranges([(entry["start"], entry["length"])]).intersect(guest)
            for r in mapped:
                pieces.append((entry["offset"] + r.start - entry["start"], r.length))
        return RangeSet.from_ranges(pieces)

    def held(self, host: RangeSet) -> int:
        """Bytes of ``host`` (qcow2 file offsets) the host filesystem still holds."""
        fd = os.open(self.disk, os.O_RDONLY)
        try:
            return held_ranges(fd).intersect(host).total
        finally:
            os.close(fd)

    def wait_back(self, host: RangeSet, started: float, within: float = BACK_WITHIN) -> float:
        """Seconds from ``started`` until ≥ 99 % of ``host`` is no longer held."""
        before = host.total
        while True:
            held = self.held(host)
            if held <= before * 0.01:
                return time.monotonic() - started
            if time.monotonic() - started > within:
                log = self.host.logs()[-6000:] if self.host else ""
                raise AssertionError(
                    f"{before - held} of {before} bytes back after {within:.0f}s "
                    f"({100 * (before - held) / before:.1f} %)\n{log}"
                )
            time.sleep(0.2)

    def record(self, key: str, value: Any) -> None:
        self.results[key] = value


def _host_config(workdir: Path, name: str) -> Path:
    """The shipped examples/libvirt/host.yaml with only what must differ in a test:
    the domain list (only ours: libvirtd is shared), where state lives, debug logs."""
    doc = yaml.safe_load((EXAMPLES / "libvirt" / "host.yaml").read_text())
    doc["hypervisor"]["domains"] = [name]
    doc["database"] = str(workdir / "deletions.sqlite")
    doc["status_socket"] = str(workdir / "status.sock")
    doc["log_level"] = "debug"
    path = workdir / "host.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    subprocess.run([sys.executable, "-m", "vmreclaim", "config", "check", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVM]:
    require_root()
    require_tool("debootstrap", "qemu-img", "qemu-system-x86_64", "virsh", "e2fsck")
    libvirt = pytest.importorskip("libvirt")
    from vmreclaim.testing.guest import system_libvirtd

    workdir = tmp_path_factory.mktemp("realvm")
    wheelhouse = build_wheelhouse(ROOT, workdir / "wheelhouse")
    image = build_image(
        wheelhouse, EXAMPLES / "libvirt" / "agent.yaml", EXAMPLES / "systemd" / "vmreclaim-agent.service"
    )
    results: dict[str, Any] = {"image_build_seconds": image.build_seconds, "image_cached": image.cached}
    disk = workdir / "root.qcow2"
    shutil.copyfile(image.qcow2, disk)
    name = f"vmreclaim-realvm-{os.getpid()}"
    with system_libvirtd(URI):
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        conn = libvirt.open(URI)
        domain = conn.defineXML(domain_xml(name, image, disk, workdir / "console.log", workdir / "qga.sock"))
        real: RealVM | None = None
        try:
            # As docs/deploy.md says: the channel through vmreclaim's own command.
            subprocess.run(
                [sys.executable, "-m", "vmreclaim", "libvirt", "enable", name, "--uri", URI],
                check=True,
                capture_output=True,
            )
            real = RealVM(name, image, disk, workdir, domain, GuestShell(domain), _host_config(workdir, name))
            real.results.update(results)
            real.start_host()
            started = time.monotonic()
            domain.create()
            real.record("boot_to_qemu_ga_seconds", round(real.shell.wait_ready(300), 1))
            assert real.host is not None
            # agent.connected is only QEMU's end of the port; hello is the agent itself.
            host = real.host
            host.wait_for(lambda _d: "agent.hello" in host.logs(), 300, "the agent's hello")
            real.record("boot_to_agent_seconds", round(time.monotonic() - started, 1))
            yield real
        finally:
            if real is not None and real.host is not None:
                real.host.stop()
            with contextlib.suppress(libvirt.libvirtError):
                if domain.isActive():
                    domain.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                domain.undefine()
            conn.close()
            out = Path(os.environ.get("VMRECLAIM_REALVM_RESULTS", workdir / "results.json"))
            if real is not None:
                out.write_text(json.dumps(real.results, indent=2) + "\n")
                print(f"\nreal-VM figures in {out}: {json.dumps(real.results)}")


def _settle(vm: RealVM) -> None:
    """Wait until the host has nothing pending for the VM (earlier work is done)."""
    assert vm.host is not None
    vm.host.wait_for(
        lambda doc: all(d["pending_bytes"] == 0 for v in doc["vms"] for d in v["disks"]),
        180,
        "nothing pending",
    )


def _delete_and_measure(vm: RealVM, make: str, paths: str, key: str) -> None:
    _settle(vm)
    vm.shell.run(f"{make} && sync")
    host = vm.host_ranges(vm.guest_ranges(paths))
    held = vm.held(host)
    assert held >= host.total * 0.99, f"written data not in the image: {held} of {host.total}"
    started = time.monotonic()
    vm.shell.run(f"rm -rf {paths}")
    seconds = vm.wait_back(host, started)
    vm.record(key, {"bytes": host.total, "delete_to_freed_seconds": round(seconds, 1)})


def test_writer_starts(vm: RealVM) -> None:
    vm.shell.run(
        f"rm -f /run/writer.stop /run/writer.result && cat > /run/writer.py <<'EOF'\n{WRITER_SCRIPT}\nEOF\n"
        "setsid python3 /run/writer.py > /run/writer.out 2>&1 < /dev/null &"
    )
    # Python starts slowly under TCG: give it time to write its first block.
    vm.shell.run(
        "for i in $(seq 300); do test -s /var/tmp/writer.log && exit 0; sleep 0.1; done; "
        "cat /run/writer.out; exit 1"
    )


def test_big_file_comes_back(vm: RealVM) -> None:
    _delete_and_measure(vm, "head -c 256M /dev/urandom > /root/big", "/root/big", "big_file_256MiB")


def test_tree_of_small_files_comes_back(vm: RealVM) -> None:
    # One process for the 2,000 files: a shell loop of `head` takes minutes under TCG.
    make = (
        'python3 -c \'import os\nfor d in range(20):\n os.makedirs(f"/root/tree/{d}")\n'
        ' for f in range(100):\n  open(f"/root/tree/{d}/{f}", "wb").write(os.urandom(16384))\''
    )
    _delete_and_measure(vm, make, "/root/tree", "tree_2000_files_16KiB")


def test_short_lived_file_comes_back(vm: RealVM) -> None:
    """Written, synced and deleted within 2 s: between two of the agent's passes."""
    _settle(vm)
    script = (
        "head -c 32M /dev/urandom > /root/brief && sync && python3 - /root/brief <<'EOF'\n"
        f"{FIEMAP_SCRIPT}\nEOF\nrm /root/brief"
    )
    started_guest = time.monotonic()
    out = vm.shell.run(script)
    started = time.monotonic()
    assert started - started_guest < 30
    doc = json.loads(out)
    guest = RangeSet.from_ranges((doc["partition_start"] + p, n) for p, n in doc["extents"])
    host = vm.host_ranges(guest)
    assert host.total >= 32 * MiB * 0.99
    seconds = vm.wait_back(host, started)
    vm.record("short_lived_32MiB", {"bytes": host.total, "delete_to_freed_seconds": round(seconds, 1)})


def test_writer_stall_under_fences_is_short(vm: RealVM) -> None:
    vm.shell.run(
        "touch /run/writer.stop; for i in $(seq 100); do test -s /run/writer.result && break; sleep 0.1; done"
    )
    result = json.loads(vm.shell.run("cat /run/writer.result"))
    assert vm.host is not None
    # Each fence as a wall-clock window on the host: from its request to its release.
    windows = []
    for stamp, seconds in re.findall(
        r"^(\S+) DEBUG fence\.released .*?seconds=([0-9.]+)", vm.host.logs(), re.M
    ):
        end = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
        windows.append((end - float(seconds), end))
    assert windows, "no fence was raised: the root filesystem was never host-punched"
    # A stall counts when it overlaps a fence (0.5 s allowed for the guest's clock).
    during = [
        gap for end, gap in result["slow"] for lo, hi in windows if end - gap < hi + 0.5 and end > lo - 0.5
    ]
    vm.record("writer_worst_gap_seconds", round(result["worst_gap_seconds"], 3))
    vm.record("writer_worst_gap_during_fences_seconds", round(max(during, default=0.0), 3))
    vm.record(
        "fences", {"count": len(windows), "longest_seconds": round(max(h - lo for lo, h in windows), 3)}
    )
    assert max(during, default=0.0) < 1.0, result


def test_kill_daemon_mid_fence_loses_nothing(vm: RealVM) -> None:
    assert vm.host is not None
    _settle(vm)
    vm.shell.run("head -c 64M /dev/urandom > /root/keep && sha256sum /root/keep > /run/keep.sum")
    vm.shell.run("head -c 128M /dev/urandom > /root/victim && sync")
    host = vm.host_ranges(vm.guest_ranges("/root/victim"))
    log_at = len(vm.host.logs())
    started = time.monotonic()
    vm.shell.run("rm /root/victim")
    deadline = started + BACK_WITHIN
    while "fence.granted" not in vm.host.logs()[log_at:]:
        assert time.monotonic() < deadline, "no fence within 60 s of the delete"
        time.sleep(0.005)
    vm.host.kill()
    killed = time.monotonic()
    # The agent thaws when the lease runs out: the guest writes again within seconds.
    vm.shell.run("echo alive > /root/after-kill && sync", timeout=30)
    writable_after = time.monotonic() - killed
    vm.record("writable_after_kill_seconds", round(writable_after, 1))
    assert writable_after < 15
    restarted = time.monotonic()
    vm.start_host()
    seconds = vm.wait_back(host, restarted, within=BACK_WITHIN + 30)
    vm.record("victim_freed_after_restart_seconds", round(seconds, 1))
    vm.shell.run("sha256sum -c /run/keep.sum && grep -q alive /root/after-kill")


def test_image_and_filesystem_clean_after_shutdown(vm: RealVM) -> None:
    # Files whose content is checked offline: one written now, and the one kept through
    # the daemon's kill -9 (when that test ran).
    sums = vm.shell.run(
        "head -c 8M /dev/urandom > /root/final && sync && sha256sum /root/final; "
        "cat /run/keep.sum 2>/dev/null; true"
    )
    expected = {path: digest for digest, path in (line.split() for line in sums.splitlines() if line)}
    # An orderly shutdown from inside, as `shutdown -h now` would (qemu-ga's own
    # guest-shutdown did not power the guest off here).
    vm.shell.spawn("systemctl poweroff")
    started = time.monotonic()
    while vm.domain.isActive():
        assert time.monotonic() - started < 300, "guest did not power off"
        time.sleep(0.5)
    vm.record("shutdown_seconds", round(time.monotonic() - started, 1))
    assert vm.host is not None
    vm.host.stop()
    subprocess.run(["qemu-img", "check", "-f", "qcow2", str(vm.disk)], check=True, capture_output=True)
    part = vm.workdir / "vda1.raw"
    # The partition alone (raw driver's offset over the qcow2), for e2fsck.
    start = 1024 * 1024
    size = 4 * 1024**3 - start
    opts = (
        f"driver=raw,offset={start},size={size},"
        f"file.driver=qcow2,file.file.driver=file,file.file.filename={vm.disk}"
    )
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts", opts, str(part)], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for path, digest in expected.items():
        dump = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(part)], capture_output=True, check=True
        ).stdout
        assert hashlib.sha256(dump).hexdigest() == digest, path
    part.unlink()
