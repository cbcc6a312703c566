#!/usr/bin/env python3
"""Host daemon ingest and delete-to-freed latency, with simulated agents (issue 7).

Runs a real ``vmreclaim host`` process with the ``static`` hypervisor and N VMs (200 by
default), each with its own sparse raw image and unix channel, and N simulated agents
in this process that speak docs/protocol.md with a window of 32 unacknowledged records,
as the real agent does. Three runs:

1. **ingest** — the ``watermark`` policy with an unreachable batch, so nothing is
   reclaimed: durable ingest, counted as ranges whose record was acknowledged (the host
   acks only after its SQLite transaction committed with ``synchronous=FULL``);
2. **reference** — the same agents against a minimal server doing what one would write
   first: one SQLite row per range and a commit per record (same WAL, same fsync), ack
   after commit. It is the reference the host's group commit is measured against;
3. **latency** — the ``always`` policy; the agents answer every fence at once with all
   ranges still free, and measure, per record, the time from sending it (the delete)
   to the host's ``release`` of the fence that covered it (the punch is done before
   the release). Agents send at fixed rates (``--latency-rate``), below and at the
   100,000 ranges/s mark, each range a separate 4 KiB hole punched in a real file.

Prints a table; ``--json`` prints one JSON document instead. Run as
``python3 bench/ingest_bench.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MiB = 1024 * 1024
WINDOW = 32
ACK_PREFIX = b'{"type":"ack","seq":'
IMAGE_SIZE = 256 * MiB
DATA_BYTES = 4 * MiB


# -- the simulated agents ------------------------------------------------------------------------


@dataclass
class AgentStats:
    acked_ranges: int = 0
    acked_records: int = 0
    ack_latency: list[float] = field(default_factory=list)
    freed_latency: list[float] = field(default_factory=list)
    fences: int = 0
    errors: int = 0


class SimAgent:
    """One agent on one VM channel: pre-encoded records, a window of 32, fences granted."""

    def __init__(self, path: Path, ranges_per_record: int, seed: int, rate: float | None) -> None:
        self.path = path
        self.n = ranges_per_record
        self.rng = random.Random(seed)
        self.rate = rate
        self.stats = AgentStats()
        self.measuring = False
        self.sent: dict[int, float] = {}
        self.unfreed: dict[int, tuple[float, int]] = {}  # seq -> (sent, first offset)
        self.bodies = [self._body() for _ in range(16)]
        self.window = asyncio.Semaphore(WINDOW)

    def _body(self) -> tuple[bytes, bytes, int]:
        # Disjoint 4 KiB ranges spread over the disk, as GETFSMAP reports free extents.
        slots = sorted(self.rng.sample(range(IMAGE_SIZE // 8192), self.n))
        pairs = ",".join(f"[{s * 8192},4096]" for s in slots)
        head = (
            '{"type":"record","record":{"v":1,"vm":"","disk":"disk0","fs":"ext4",'
            f'"bytes":{4096 * self.n},"ranges":[{pairs}],"seq":'
        ).encode()
        return head, b"}}\n", slots[0] * 8192

    async def run(self, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=8 * MiB)
        writer.write(
            json.dumps(
                {
                    "type": "hello",
                    "v": 1,
                    "agent": "bench",
                    "capabilities": ["records", "fence"],
                    "disks": [{"id": "disk0"}],
                }
            ).encode()
            + b"\n"
        )
        welcome = json.loads(await reader.readline())
        if welcome.get("type") not in ("welcome", None):
            raise RuntimeError(f"not welcomed: {welcome}")
        receiver = asyncio.get_running_loop().create_task(self._receive(reader, writer))
        seq = 0
        interval = 1.0 / self.rate if self.rate else 0.0
        next_at = time.monotonic() + self.rng.random() * interval
        try:
            while not stop.is_set():
                await self.window.acquire()
                if interval:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at += interval
                seq += 1
                head, tail, first = self.bodies[seq % len(self.bodies)]
                now = time.monotonic()
                self.sent[seq] = now
                if self.rate:
                    self.unfreed[seq] = (now, first)
                writer.write(head + str(seq).encode() + tail)
                if writer.transport.get_write_buffer_size() > 1 * MiB:
                    await writer.drain()
        finally:
            receiver.cancel()
            writer.close()

    async def _receive(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fences: dict[int, list[list[int]]] = {}
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.startswith(ACK_PREFIX):  # the hot path: no JSON parser for an ack
                msg = {"type": "ack", "seq": int(line[len(ACK_PREFIX) : line.index(b"}")])}
            else:
                msg = json.loads(line)
            kind = msg["type"]
            if kind == "ack":
                sent = self.sent.pop(msg["seq"], None)
                self.window.release()
                if self.measuring and sent is not None:
                    self.stats.acked_records += 1
                    self.stats.acked_ranges += self.n
                    self.stats.ack_latency.append(time.monotonic() - sent)
            elif kind == "nack":
                self.stats.errors += 1
                self.sent.pop(msg["seq"], None)
                self.window.release()
            elif kind == "fence":
                fences[msg["fence"]] = msg["ranges"]
                writer.write(
                    json.dumps(
                        {
                            "type": "fence_ready",
                            "fence": msg["fence"],
                            "disk": msg["disk"],
                            "ranges": msg["ranges"],
                            "lease_ms": msg["lease_ms"],
                        }
                    ).encode()
                    + b"\n"
                )
            elif kind == "release":
                now = time.monotonic()
                covered = {s for s, _ in fences.pop(msg["fence"], [])}
                self.stats.fences += 1
                for seq, (sent, first) in list(self.unfreed.items()):
                    if first in covered and seq not in self.sent:
                        del self.unfreed[seq]
                        if self.measuring:
                            self.stats.freed_latency.append(now - sent)
                writer.write(
                    json.dumps({"type": "released", "fence": msg["fence"], "why": "release"}).encode() + b"\n"
                )
            elif kind == "error":
                self.stats.errors += 1


async def drive(
    channels: list[Path], ranges: int, seconds: float, warmup: float, rate: float | None
) -> tuple[list[SimAgent], float]:
    agents = [SimAgent(p, ranges, i, rate) for i, p in enumerate(channels)]
    stop = asyncio.Event()
    tasks = [asyncio.get_running_loop().create_task(a.run(stop)) for a in agents]
    await asyncio.sleep(warmup)
    for a in agents:
        a.measuring = True
    started = time.monotonic()
    await asyncio.sleep(seconds)
    for a in agents:
        a.measuring = False
    elapsed = time.monotonic() - started
    stop.set()
    for a in agents:  # unblock senders waiting for window room
        for _ in range(WINDOW):
            a.window.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    return agents, elapsed


# -- the two servers ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_site(root: Path, n: int) -> list[dict[str, Any]]:
    vms = []
    data = os.urandom(DATA_BYTES)
    for i in range(n):
        image = root / f"vm{i}.raw"
        with open(image, "wb") as f:
            f.write(data)
            f.truncate(IMAGE_SIZE)
        vms.append(
            {
                "name": f"vm{i}",
                "disks": [{"id": "disk0", "path": str(image), "format": "raw"}],
                "channel": {"driver": "unix", "path": str(root / f"vm{i}.sock")},
            }
        )
    return vms


def start_host(
    root: Path, vms: list[dict[str, Any]], policy: dict[str, Any], name: str, parallel: int = 4
) -> subprocess.Popen[bytes]:
    config = {
        "hypervisor": {"driver": "static", "vms": vms},
        "policy": policy,
        "database": str(root / f"{name}.sqlite"),
        "status_socket": str(root / f"{name}.status.sock"),
        "log_level": "warning",
        "fence": {"lease_seconds": 5, "margin_seconds": 0.5},
        "reclaim": {"tick_seconds": 1.0, "parallel": parallel},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(root / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmreclaim", "host", "--config", str(path)], stdout=log, stderr=log
    )
    wait_for_sockets(proc, [Path(vm["channel"]["path"]) for vm in vms] + [Path(config["status_socket"])])
    return proc


def wait_for_sockets(proc: subprocess.Popen[bytes], paths: list[Path]) -> None:
    deadline = time.monotonic() + 60
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start (exit {proc.poll()})")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def reference_server(root: Path, n: int) -> None:
    """The reference: one row per range, one commit per record, ack after commit."""
    db = sqlite3.connect(root / "reference.sqlite", isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS ranges (vm TEXT, disk TEXT, seq INTEGER, start INTEGER, length INTEGER)"
    )

    async def serve(vm: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"type":"welcome","v":1,"vm":"%s","disks":[]}\n' % vm.encode())
        while line := await reader.readline():
            rec = json.loads(line)["record"]
            rows = [(vm, rec["disk"], rec["seq"], s, n) for s, n in rec["ranges"]]
            db.execute("BEGIN")
            db.executemany("INSERT INTO ranges VALUES (?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
            writer.write(b'{"type":"ack","seq":%d}\n' % rec["seq"])

    async def main() -> None:
        servers = []
        for i in range(n):
            path = root / f"vm{i}.sock"
            path.unlink(missing_ok=True)
            servers.append(
                await asyncio.start_unix_server(
                    lambda r, w, vm=f"vm{i}": serve(vm, r, w), str(path), limit=8 * MiB
                )
            )
        stop_event = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop_event.set)
        await stop_event.wait()

    asyncio.run(main())


# -- the runs ------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def summarise(name: str, agents: list[SimAgent], elapsed: float, cpu: float) -> dict[str, Any]:
    ranges = sum(a.stats.acked_ranges for a in agents)
    records = sum(a.stats.acked_records for a in agents)
    acks = [x for a in agents for x in a.stats.ack_latency]
    freed = [x for a in agents for x in a.stats.freed_latency]
    return {
        "run": name,
        "seconds": round(elapsed, 2),
        "ranges_per_second": round(ranges / elapsed),
        "records_per_second": round(records / elapsed),
        "ack_p50_ms": round(1000 * (pct(acks, 50) or 0), 2),
        "ack_p99_ms": round(1000 * (pct(acks, 99) or 0), 2),
        "freed_p50_ms": round(1000 * p, 1) if (p := pct(freed, 50)) is not None else None,
        "freed_p99_ms": round(1000 * p, 1) if (p := pct(freed, 99)) is not None else None,
        "freed_samples": len(freed),
        "fences": sum(a.stats.fences for a in agents),
        "errors": sum(a.stats.errors for a in agents),
        "server_cpu_seconds": round(cpu, 2),
    }


def measure(
    vms: list[dict[str, Any]],
    proc: subprocess.Popen[bytes],
    name: str,
    args: argparse.Namespace,
    ranges_per_record: int,
    rate: float | None,
) -> dict[str, Any]:
    channels = [Path(vm["channel"]["path"]) for vm in vms]
    cpu0 = cpu_seconds(proc.pid)
    agents, elapsed = asyncio.run(drive(channels, ranges_per_record, args.seconds, args.warmup, rate))
    cpu = cpu_seconds(proc.pid) - cpu0
    stop(proc)
    result = summarise(name, agents, elapsed, cpu)
    result["ranges_per_record"] = ranges_per_record
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--ranges-per-record", type=int, nargs="+", default=[16, 256])
    parser.add_argument(
        "--latency-rate", type=float, nargs="+", default=[0.5, 2.0], help="records per second per agent"
    )
    parser.add_argument("--parallel", type=int, default=8, help="reclaim.parallel of the latency run")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--reference-server", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_server:
        reference_server(args.reference_server, args.agents)
        return 0

    hold = {"driver": "watermark", "batch_bytes": 2**60, "high_watermark": 1.0}
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="ingest-bench-") as tmp:
        root = Path(tmp)
        vms = make_site(root, args.agents)
        for n in args.ranges_per_record:
            host = start_host(root, vms, hold, f"ingest-{n}")
            results.append(measure(vms, host, "vmreclaim host: durable ingest", args, n, None))
            (root / "reference.sqlite").unlink(missing_ok=True)
            ref = subprocess.Popen(
                [sys.executable, __file__, "--agents", str(args.agents), "--reference-server", str(root)]
            )
            wait_for_sockets(ref, [Path(vm["channel"]["path"]) for vm in vms])
            results.append(measure(vms, ref, "reference: row per range, commit per record", args, n, None))
        n = args.ranges_per_record[-1]
        for rate in args.latency_rate:
            host = start_host(root, vms, {"driver": "always"}, f"latency-{rate:g}", args.parallel)
            name = f"vmreclaim host: always policy, {rate:g} records/s per agent"
            results.append(measure(vms, host, name, args, n, rate))
    doc = {"agents": args.agents, "cpus": os.cpu_count(), "results": results}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.agents} simulated agents over unix sockets, {os.cpu_count()} CPUs")
    cols = [
        "run", "ranges_per_record", "ranges_per_second", "records_per_second", "ack_p50_ms", "ack_p99_ms",
        "freed_p50_ms", "freed_p99_ms", "freed_samples", "server_cpu_seconds", "errors",
    ]  # fmt: skip
    for col in cols:
        table.add_column(col.replace("_", " "), justify="left" if col == "run" else "right")
    for r in results:
        table.add_row(*("-" if r[c] is None else str(r[c]) for c in cols))
    Console(width=200).print(table)
    for n in args.ranges_per_record:
        rate = {r["run"]: r["ranges_per_second"] for r in results if r["ranges_per_record"] == n}
        mine, ref = (
            rate["vmreclaim host: durable ingest"],
            rate["reference: row per range, commit per record"],
        )
        print(f"{n} ranges/record: durable ingest {mine} ranges/s, {mine / max(1, ref):.1f}x the reference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
