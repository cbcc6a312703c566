"""``vmreclaim status`` and the Prometheus endpoint, against a real daemon process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from hosttest import MiB, allocated

from vmreclaim.testing.helpers import make_raw_image
from vmreclaim.testing.host import AgentPeer, HostProcess, host_config, static_vm


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmreclaim", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_status_json_text_and_metrics(tmp_path: Path, host_daemon: Callable[..., HostProcess]) -> None:
    image = make_raw_image(tmp_path / "vm1.raw", 8 * MiB, [(0, 8 * MiB)])
    channel = tmp_path / "vm1.sock"
    vms = [
        static_vm("vm1", channel, [{"id": "disk0", "path": image, "format": "raw"}]),
        static_vm("vm2", tmp_path / "vm2.sock", [{"id": "root", "path": image, "format": "raw"}]),
    ]
    host = host_daemon(vms, metrics={"port": 0}, reclaim={"tick_seconds": 0.2})

    async def agent() -> None:
        async with AgentPeer(channel) as peer:
            seq = await peer.send_record([(0, MiB), (4 * MiB, 2 * MiB)])
            await peer.send_raw(b"not json\n")
            await peer.wait_answered(seq)
            await peer.wait_until(lambda: len(peer.releases) == 1)

    asyncio.run(agent())
    doc = host.wait_for(lambda d: d["vms"][0]["disks"][0]["punched_bytes"] == 3 * MiB, what="punch")
    assert allocated(image) == 5 * MiB

    out = cli("status", "--json", "--config", str(host.config))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [v["name"] for v in doc["vms"]] == ["vm1", "vm2"]
    vm1 = doc["vms"][0]
    assert vm1["running"] is False
    disk = vm1["disks"][0]
    for key in ("id", "path", "format", "pending_bytes", "punched_bytes", "freed_bytes", "last_reclaim"):
        assert key in disk
    assert disk["id"] == "disk0" and disk["path"] == str(image) and disk["format"] == "raw"
    assert disk["pending_bytes"] == 0 and disk["freed_bytes"] == 3 * MiB
    assert isinstance(disk["last_reclaim"], float)
    assert doc["policy"] == {"driver": "always"}
    assert doc["rejected_records"] == 1
    assert doc["vms"][1]["disks"][0]["last_reclaim"] is None

    # Without --config: the socket from the environment.
    out = cli("status", env={"VMRECLAIM_STATUS_SOCKET": str(host.status_socket), "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "vm1" in out.stdout and "3.0 MiB" in out.stdout and "always" in out.stdout

    port = doc["metrics"]["port"]
    m = scrape(port)
    assert m['vmreclaim_freed_bytes_total{disk="disk0",vm="vm1"}'] == 3 * MiB
    assert m['vmreclaim_punched_bytes_total{disk="disk0",vm="vm1"}'] == 3 * MiB
    assert m['vmreclaim_records_received_total{disk="disk0",vm="vm1"}'] == 1
    assert m['vmreclaim_ranges_received_total{disk="disk0",vm="vm1"}'] == 2
    assert m['vmreclaim_records_rejected_total{kind="malformed",vm="vm1"}'] == 1
    assert m['vmreclaim_pending_bytes{disk="disk0",vm="vm1"}'] == 0
    assert m["vmreclaim_delete_to_freed_seconds_count"] == 1
    assert m['vmreclaim_reclaims_total{disk="disk0",mode="fence",outcome="done",vm="vm1"}'] == 1
    assert m["vmreclaim_fence_seconds_count"] == 1
    assert host.stop() == 0
    # Structured logs: one event per line with its fields.
    assert "reclaim.done disk=vm1/disk0 mode=fence" in host.logs()


def test_status_without_a_daemon_says_where_it_looked(tmp_path: Path) -> None:
    out = cli("status", "--json", env={"VMRECLAIM_STATUS_SOCKET": str(tmp_path / "none.sock")})
    assert out.returncode == 1
    assert f"no host daemon status socket at {tmp_path / 'none.sock'}" in out.stderr
    assert out.stdout == ""


def test_json_logs_and_a_second_daemon_on_the_same_socket(
    tmp_path: Path, host_daemon: Callable[..., HostProcess]
) -> None:
    image = make_raw_image(tmp_path / "vm1.raw", MiB, [(0, MiB)])
    vms = [static_vm("vm1", tmp_path / "vm1.sock", [{"id": "disk0", "path": image, "format": "raw"}])]
    first = host_daemon(vms, log_format="json", log_level="debug")
    config = host_config(
        tmp_path / "second.yaml", vms, database=tmp_path / "other.sqlite", status_socket=first.status_socket
    )
    out = cli("host", "--config", str(config))
    assert out.returncode == 2
    assert (
        f"status_socket {first.status_socket}: another vmreclaim host daemon is listening there" in out.stderr
    )
    config = host_config(
        tmp_path / "third.yaml", vms, database=first.database, status_socket=tmp_path / "third.sock"
    )
    out = cli("host", "--config", str(config))
    assert out.returncode == 2 and "in use by another vmreclaim host daemon" in out.stderr
    # The refused daemons left the running one's socket alone.
    assert first.proc is not None and first.status()["pid"] == first.proc.pid
    assert first.stop() == 0
    events = [json.loads(line) for line in first.logs().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "host.ready" in names and "host.stopped" in names
    ready = events[names.index("host.ready")]
    assert ready["vms"] == 1 and ready["policy"] == "always" and ready["level"] == "info"


def test_a_bad_config_exits_2_naming_the_line(tmp_path: Path) -> None:
    config = tmp_path / "host.yaml"
    config.write_text(
        "hypervisor:\n  driver: static\n  vms: []\ndatabase: /tmp/x.sqlite\nstatus_socket: /tmp/x.sock\n"
        "fence: {lease_seconds: 1, margin_seconds: 2}\n"
    )
    out = cli("host", "--config", str(config))
    assert out.returncode == 2
    assert f"{config}:3: hypervisor.vms" in out.stderr
    assert f"{config}:6: fence" in out.stderr and "margin_seconds 2.0 leaves nothing" in out.stderr
