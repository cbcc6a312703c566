"""A real single-node Ceph cluster for tests: one monitor, one manager, one OSD.

Built from Debian's ``ceph-mon``, ``ceph-mgr`` and ``ceph-osd`` packages by hand (no
cephadm, no systemd): every file — configuration, keyrings, the monitor's store, the
OSD's bluestore (on a sparse file it creates), logs, admin sockets — lives in one
temporary directory, and every daemon runs in the foreground as a child of the test
process, so tearing the cluster down is killing three children and removing one
directory. The monitor listens on Ceph's fixed ports (3300 and 6789 on 127.0.0.1), so
only one such cluster can run on a machine at a time; :func:`ceph_cluster` refuses to
start a second one.

Debian's ``rados`` and ``rbd`` Python modules are built for the system Python
(``/usr/bin/python3``, 3.11). ``python -m vmreclaim.testing.ceph link-bindings`` makes
another CPython 3.11 environment (a venv, a tox env) see exactly those two modules and
nothing else from Debian's ``dist-packages``: it links them into a private directory and
adds that directory to ``site-packages`` with a ``.pth`` file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The monitor's addresses: Ceph's well-known ports, hence one cluster per machine.
MON_PORTS = (3300, 6789)
POOL = "rbd"
DEBIAN_DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
BINDINGS = ("rados", "rbd")
REQUIRED_TOOLS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd", "monmaptool", "ceph-authtool")


class CephUnavailable(RuntimeError):
    """The packages, the privileges or the ports a test cluster needs are missing."""


@dataclass
class CephCluster:
    """A running test cluster and the commands to use it."""

    root: Path
    pool: str = POOL
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: Wall-clock seconds from nothing to a usable pool.
    start_seconds: float = 0.0

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def keyring(self) -> Path:
        return self.root / "client.admin.keyring"

    def spec(self, image: str, snap: str | None = None) -> str:
        """The vmreclaim/QEMU name of ``image`` in the test pool: ``rbd:POOL/IMAGE:conf=...``."""
        at = f"@{snap}" if snap else ""
        return f"rbd:{self.pool}/{image}{at}:conf={self.conf}"

    def ceph(self, *args: str, input: bytes | None = None, timeout: float = 60) -> str:
        """Run the ``ceph`` CLI against this cluster; its stdout."""
        return self._run(["ceph", "--conf", str(self.conf), *args], input, timeout)

    def rbd(self, *args: str, timeout: float = 120) -> str:
        """Run the ``rbd`` CLI against this cluster; its stdout."""
        return self._run(["rbd", "--conf", str(self.conf), *args], None, timeout)

    def du(self, image: str) -> int:
        """Bytes of ``image`` that RADOS holds (``rbd du``'s used size, head only)."""
        doc = json.loads(self.rbd("du", "--format", "json", f"{self.pool}/{image}"))
        return sum(int(i["used_size"]) for i in doc["images"] if i.get("snapshot") is None)

    def pool_stored(self) -> int:
        """Bytes stored in the pool (``ceph df``'s ``stored``)."""
        doc = json.loads(self.ceph("df", "--format", "json"))
        return next(int(p["stats"]["stored"]) for p in doc["pools"] if p["name"] == self.pool)

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of each daemon, from ``/proc``: what the cluster costs."""
        out: dict[str, int] = {}
        for proc in self.processes:
            name = Path(str(proc.args[0])).name  # type: ignore[index]
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) * 1024
        return out

    def cpu_seconds(self) -> float:
        """User plus system CPU seconds the daemons have used so far (``/proc/PID/stat``)."""
        total = 0
        for proc in self.processes:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def _run(self, argv: list[str], input: bytes | None, timeout: float) -> str:
        done = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
            )
        return done.stdout.decode()

    def stop(self) -> None:
        """Stop every daemon (TERM, then KILL after 15 s) and remove the directory."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def unavailable_reason() -> str | None:
    """Why a test cluster cannot start here, or ``None``."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"Ceph tools missing: {', '.join(missing)} (scripts/setup.sh installs them)"
    if os.geteuid() != 0:
        return "a test Ceph cluster needs root"
    for port in MON_PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"port {port} is in use: another Ceph monitor runs on this machine"
    return None


def _conf(root: Path, fsid: str) -> str:
    # Everything under root: a daemon that falls back to /var/lib/ceph or /var/log/ceph
    # would leave files behind. Admin sockets per daemon type: a [global] one would be
    # shared by every client process and clash. The admin keyring only for clients: in
    # [global] it would also be the daemons' keyring and they could not authenticate.
    return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{MON_PORTS[0]},v1:127.0.0.1:{MON_PORTS[1]}]
mon initial members = a
run dir = {root}/run
log file = {root}/log/$name.log
mon cluster log file = {root}/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
auth allow insecure global id reclaim = false
paxos propose interval = 0.1
ms bind ipv6 = false
mon data avail warn = 1
# usage statistics (ceph df, the policy's input) within a second or two, not five
osd mon report interval = 1
mgr stats period = 1
[client]
keyring = {root}/client.admin.keyring
[mon]
mon data = {root}/mon/$cluster-$id
admin socket = {root}/run/$name.asok
[mgr]
mgr data = {root}/mgr/$cluster-$id
keyring = {root}/mgr/$cluster-$id/keyring
admin socket = {root}/run/$name.asok
[osd]
osd data = {root}/osd/$cluster-$id
keyring = {root}/osd/$cluster-$id/keyring
admin socket = {root}/run/$name.asok
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 10737418240
bluestore fsck on mkfs = false
osd memory target = 939524096
"""


def _check(argv: Sequence[str], input: bytes | None = None, timeout: float = 60) -> str:
    done = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {err}")
    return done.stdout.decode()


def start_cluster(root: Path, timeout: float = 90) -> CephCluster:
    """Create and start a one-mon, one-mgr, one-OSD cluster in ``root`` (must not exist
    or be empty) with a replicated pool ``rbd`` of size 1 ready for RBD images."""
    reason = unavailable_reason()
    if reason is not None:
        raise CephUnavailable(reason)
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "log", "mon/ceph-a", "mgr/ceph-x", "osd/ceph-0"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    fsid = str(uuid.uuid4())
    conf = root / "ceph.conf"
    conf.write_text(_conf(root, fsid))
    cluster = CephCluster(root)
    c = ["--conf", str(conf)]
    try:
        mon_keyring = root / "mon.keyring"  # the seed keyring, outside the mon's data dir
        _check(["ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
                "--cap", "mon", "allow *"])
        _check(["ceph-authtool", "--create-keyring", str(cluster.keyring), "--gen-key", "-n", "client.admin",
                "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"])
        _check(["ceph-authtool", str(mon_keyring), "--import-keyring", str(cluster.keyring)])
        monmap = root / "monmap"
        _check(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                f"[v2:127.0.0.1:{MON_PORTS[0]},v1:127.0.0.1:{MON_PORTS[1]}]", str(monmap)])
        _check(["ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", str(mon_keyring)])
        cluster.processes.append(_daemon(["ceph-mon", *c, "-f", "-i", "a"], root))
        mgr_keyring = root / "mgr/ceph-x/keyring"
        cluster.ceph("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *",
                     "-o", str(mgr_keyring), timeout=timeout)
        cluster.processes.append(_daemon(["ceph-mgr", *c, "-f", "-i", "x"], root))
        osd_uuid = str(uuid.uuid4())
        secret = _check(["ceph-authtool", "--gen-print-key"]).strip()
        osd_id = cluster.ceph("osd", "new", osd_uuid, "-i", "-",
                              input=json.dumps({"cephx_secret": secret}).encode()).strip()
        if osd_id != "0":
            raise RuntimeError(f"the new OSD got id {osd_id!r}, not 0")
        (root / "osd/ceph-0/keyring").write_text(f"[osd.0]\n\tkey = {secret}\n")
        _check(["ceph-osd", *c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, "--no-mon-config"],
               timeout=timeout)
        cluster.processes.append(_daemon(["ceph-osd", *c, "-f", "-i", "0"], root))
        cluster.ceph("osd", "pool", "create", POOL, "8")
        cluster.rbd("pool", "init", POOL, timeout=timeout)
        _wait_active(cluster, started + timeout)
    except BaseException:
        cluster.stop()
        raise
    cluster.start_seconds = time.monotonic() - started
    return cluster


def _daemon(argv: list[str], root: Path) -> subprocess.Popen[bytes]:
    log = open(root / "log" / f"{Path(argv[0]).name}.stderr", "wb")  # noqa: SIM115 - the child keeps it
    with log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_active(cluster: CephCluster, deadline: float) -> None:
    """Until every placement group is active+clean and the OSD is up: a usable pool."""
    last = ""
    while time.monotonic() < deadline:
        for proc in cluster.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}; logs in {cluster.root}/log")
        doc: dict[str, Any] = json.loads(cluster.ceph("pg", "stat", "--format", "json"))
        summary = doc.get("pg_summary", doc)
        states = {s["name"]: int(s["num"]) for s in summary.get("num_pg_by_state", [])}
        total = int(summary.get("num_pgs", 0))
        last = f"{states} of {total}"
        if total and states.get("active+clean", 0) == total:
            return
        time.sleep(0.2)
    raise RuntimeError(f"Ceph test cluster not active+clean in time: placement groups {last}")


@contextlib.contextmanager
def ceph_cluster(root: Path, timeout: float = 90) -> Iterator[CephCluster]:
    """A running cluster for the block; stopped and its directory removed afterwards."""
    cluster = start_cluster(root, timeout)
    try:
        yield cluster
    finally:
        cluster.stop()


def link_bindings(site_packages: Path | None = None, source: Path = DEBIAN_DIST_PACKAGES) -> Path:
    """Make this interpreter's environment import Debian's ``rados`` and ``rbd``.

    Links only those two extension modules into ``<site-packages>/../vmreclaim-ceph-bindings``
    and writes ``vmreclaim-ceph-bindings.pth`` naming it; returns the ``.pth`` path.
    Refuses an interpreter whose ABI tag differs from the modules' (they would not load).
    """
    site = Path(site_packages or sysconfig.get_paths()["purelib"])
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ""
    target = site.parent / "vmreclaim-ceph-bindings"
    target.mkdir(exist_ok=True)
    for name in BINDINGS:
        module = source / f"{name}{suffix}"
        if not module.exists():
            found = sorted(p.name for p in source.glob(f"{name}.*.so"))
            raise CephUnavailable(
                f"{module} not found (this Python wants the suffix {suffix!r}; {source} has "
                f"{found or 'none'}): install python3-{name} or use a CPython of that version"
            )
        link = target / module.name
        link.unlink(missing_ok=True)
        link.symlink_to(module)
    pth = site / "vmreclaim-ceph-bindings.pth"
    pth.write_text(f"{target}\n")
    return pth


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["link-bindings"]:
        print(link_bindings(Path(args[1]) if len(args) > 1 else None))
        return 0
    if args[:1] == ["bench-start"]:
        with ceph_cluster(Path(args[1])) as cluster:
            print(json.dumps({"start_seconds": round(cluster.start_seconds, 2), "rss": cluster.rss_bytes()}))
        return 0
    print("usage: python -m vmreclaim.testing.ceph link-bindings [SITE_PACKAGES] | bench-start DIR",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
