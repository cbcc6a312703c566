#!/usr/bin/env python3
"""What the guest agent costs: ``rm -rf`` of a 50,000-file tree on a loop-mounted ext4.

Three ways, in one run, each on a fresh copy of the same filesystem (built with
``mkfs.ext4 -d`` from one source tree, so every run deletes the same files):

* **none**       — a plain mount, nothing watching;
* **agent**      — ``vmreclaim agent`` running (fanotify, fsmap capture, a host peer on
                   a Unix socket acknowledging every record), as a separate process;
* **discard**    — ``mount -o discard``: the kernel discards freed blocks itself (the
                   reference way to give space back, when the disk passes discards).

Columns: wall time of ``rm -rf`` alone and of ``rm -rf; sync`` (the agent's passes
call syncfs, so the fair comparison includes the commit), the ratio to *none*, the
agent's CPU seconds (user + system, from /proc) from the start of the ``rm`` until
it has reported the freed space, and how long after the ``rm`` ended the last record
arrived. Medians of ``--repeat`` runs. Needs root.

    sudo python3 bench/agent_overhead.py                 # 50,000 files, 3 runs each
    sudo python3 bench/agent_overhead.py --files 10000 --repeat 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from vmreclaim.core import protocol as p
from vmreclaim.testing.linux import loop_mounted

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def build_tree(src: Path, files: int) -> int:
    """``files`` files of 1–16 KiB in 100-file directories, two levels deep."""
    total = 0
    per_dir = 100
    for i in range(files):
        d = src / f"d{i // (per_dir * 50)}" / f"e{(i // per_dir) % 50}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = 1024 * (1 + (i * 7919) % 16)
        (d / f"f{i}").write_bytes(b"v" * size)
        total += size
    return total


@contextlib.contextmanager
def mounted_copy(src: Path, work: Path, options: str) -> Iterator[Path]:
    """A fresh ext4 holding ``src``, loop-mounted with ``options``."""
    image = work / "fs.img"
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(2048 * MiB)
    sh(
        "mkfs.ext4",
        "-q",
        "-F",
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
        "-d",
        str(src),
        str(image),
    )
    with loop_mounted(image, work / "mnt", options=[options] if options else []) as (_dev, mnt):
        # Warm the inode and dentry caches the same way for every variant.
        subprocess.run(["find", str(mnt), "-type", "f"], check=True, capture_output=True)
        yield mnt


class Peer:
    """A host stand-in: welcomes the agent and acknowledges every record."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.records: list[tuple[float, int]] = []
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        f = conn.makefile("rb")
        for line in f:
            msg = p.decode_from_agent(line)
            if isinstance(msg, p.Hello):
                disks = [p.WelcomeDisk(id=d.id, size=d.size) for d in msg.disks]
                conn.sendall(p.encode(p.Welcome(v=p.PROTOCOL_VERSION, vm="bench", disks=disks)))
            elif isinstance(msg, p.RecordMessage):
                self.records.append((time.monotonic(), msg.record["bytes"]))
                conn.sendall(p.encode(p.Ack(seq=msg.record["seq"])))
                self.ready.set()

    def close(self) -> None:
        self.sock.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def timed_rm(mnt: Path) -> tuple[float, float, float, float]:
    """(when it started, seconds of ``rm -rf``, seconds of ``rm -rf`` + ``sync``, CPU
    seconds of the ``rm`` process: its system time is where fanotify's cost shows)."""
    trees = [str(d) for d in mnt.iterdir() if d.name.startswith("d")]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    subprocess.run(["rm", "-rf", *trees], check=True)
    rm = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return start, rm, time.monotonic() - start, cpu


def run_none(src: Path, work: Path) -> dict[str, float]:
    with mounted_copy(src, work, "") as mnt:
        _, rm, rm_sync, rm_cpu = timed_rm(mnt)
    return {"rm": rm, "rm_sync": rm_sync, "rm_cpu": rm_cpu}


def run_discard(src: Path, work: Path) -> dict[str, float]:
    with mounted_copy(src, work, "discard") as mnt:
        _, rm, rm_sync, rm_cpu = timed_rm(mnt)
    return {"rm": rm, "rm_sync": rm_sync, "rm_cpu": rm_cpu}


def run_agent(src: Path, work: Path, freed: int) -> dict[str, float]:
    sock = work / "host.sock"
    sock.unlink(missing_ok=True)
    peer = Peer(sock)
    with mounted_copy(src, work, "") as mnt:
        config = {
            "transport": {"driver": "unix", "path": str(sock)},
            "filesystems": [{"mount": str(mnt), "disk": "disk0"}],
            "spool": str(work / "spool"),
            "log_level": "warning",
        }
        shutil.rmtree(work / "spool", ignore_errors=True)
        (work / "agent.yaml").write_text(yaml.safe_dump(config))
        agent = subprocess.Popen(
            [sys.executable, "-m", "vmreclaim", "agent", "--config", str(work / "agent.yaml")],
            stderr=open(work / "agent.log", "wb"),  # noqa: SIM115
        )
        try:
            if not peer.ready.wait(60):
                raise SystemExit(f"the agent did not report its start:\n{(work / 'agent.log').read_text()}")
            time.sleep(1.0)
            before = len(peer.records)
            cpu0 = cpu_seconds(agent.pid)
            start, rm, rm_sync, rm_cpu = timed_rm(mnt)
            end_rm = start + rm
            # Until the agent has reported (nearly) all the freed space.
            deadline = time.monotonic() + 60
            while sum(b for _, b in peer.records[before:]) < 0.9 * freed and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            cpu = cpu_seconds(agent.pid) - cpu0
            reported = sum(b for _, b in peer.records[before:])
            last = max((t for t, _ in peer.records[before:]), default=end_rm)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
            peer.close()
    return {
        "rm": rm,
        "rm_sync": rm_sync,
        "rm_cpu": rm_cpu,
        "cpu": cpu,
        "reported": reported,
        "lag": last - end_rm,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("agent_overhead: needs root (loop devices, mount, fanotify)", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vmreclaim-agent-bench-"))
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    data = build_tree(src, args.files)
    print(f"tree: {args.files} files, {data / MiB:.1f} MiB of data; ext4 on a 2 GiB loop device")
    print(f"medians of {args.repeat} runs each, variants in rotating order")
    results: dict[str, list[dict[str, float]]] = {"none": [], "agent": [], "discard": []}
    runners = {
        "none": lambda: run_none(src, work),
        "agent": lambda: run_agent(src, work, data),
        "discard": lambda: run_discard(src, work),
    }
    run_none(src, work)  # warm-up, not counted: the first run pays for cold caches
    order = list(runners)
    for i in range(args.repeat):
        for name in order[i % 3 :] + order[: i % 3]:  # rotate: no variant always goes first
            results[name].append(runners[name]())

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    base_rm, base_sync = med("none", "rm"), med("none", "rm_sync")
    head = (
        "variant",
        "rm -rf s",
        "ratio",
        "rm+sync s",
        "ratio",
        "rm CPU s",
        "agent CPU s",
        "reported MiB",
        "lag s",
    )
    widths = (10, 9, 7, 10, 7, 9, 12, 13, 6)
    print(
        " ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True)))
    )
    for name in ("none", "agent", "discard"):
        rm, rs = med(name, "rm"), med(name, "rm_sync")
        agent = name == "agent"
        row = (
            name,
            f"{rm:.3f}",
            f"{rm / base_rm:.3f}",
            f"{rs:.3f}",
            f"{rs / base_sync:.3f}",
            f"{med(name, 'rm_cpu'):.3f}",
            f"{med(name, 'cpu'):.2f}" if agent else "-",
            f"{med(name, 'reported') / MiB:.1f}" if agent else "-",
            f"{med(name, 'lag'):.2f}" if agent else "-",
        )
        print(
            " ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    added = med("agent", "rm") / base_rm - 1
    print(f"agent: {added * 100:+.1f} % wall time on rm -rf (target < 5 %)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
