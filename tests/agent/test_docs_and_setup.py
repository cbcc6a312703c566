"""docs/protocol.md describes every message; the agent refuses to start on a bad setup
with one line naming the problem (exit 2); its imports stay guest-sized."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from tests.agent.conftest import LoopFs, agent_config
from vmreclaim.core import protocol as p

ROOT = Path(__file__).resolve().parents[2]


def message_types() -> set[str]:
    out = set()
    for union in (p.AgentMessage, p.HostMessage):
        for model in get_args(get_args(union)[0]):
            out.add(model.model_fields["type"].default)
    return out


def test_protocol_doc_describes_every_message() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    documented = set(re.findall(r"^### `([a-z_]+)`", text, flags=re.M))
    documented |= {
        t for line in re.findall(r"^### (.+)$", text, flags=re.M) for t in re.findall(r"`([a-z_]+)`", line)
    }
    missing = message_types() - documented
    assert not missing, f"docs/protocol.md has no section for {sorted(missing)}"
    assert f"this is version **{p.PROTOCOL_VERSION}**" in text


def test_agent_imports_nothing_of_the_host() -> None:
    """The agent must install in a guest: no vmreclaim.host, no rich, no libvirt."""
    code = (
        "import sys, vmreclaim.agent.main, vmreclaim.agent.guardian\n"
        "import vmreclaim.plugins.captures.fsmap, vmreclaim.plugins.captures.fiemap\n"
        "import vmreclaim.plugins.transports.virtio_serial, vmreclaim.plugins.transports.vsock\n"
        "import vmreclaim.plugins.transports.tcp, vmreclaim.plugins.transports.unix\n"
        "banned = ('vmreclaim.host', 'rich', 'libvirt', 'XenAPI', 'qemu')\n"
        "bad = [m for m in sys.modules if m.startswith(banned)]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_guardian_needs_neither_numpy_nor_pydantic() -> None:
    """The thaw guardian starts fast and small: only the standard library (and the
    package root, which imports pluggy for ``hookimpl``)."""
    code = (
        "import sys, vmreclaim.agent.guardian\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('numpy', 'pydantic', 'yaml')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def run_agent(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "vmreclaim", "agent", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.root
def test_bad_setups_exit_2_naming_the_problem(tmp_path: Path, loopfs: Callable[..., LoopFs]) -> None:
    fs = loopfs("ext4")
    base = agent_config(tmp_path, fs)
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {**base, "filesystems": [{"mount": str(fs.mount / "lost+found"), "disk": "d"}]},
            "not a mount point",
        ),
        ({**base, "filesystems": [{"mount": str(tmp_path / "nowhere"), "disk": "d"}]}, "cannot open it"),
        ({**base, "filesystems": [{"mount": str(fs.mount)}]}, "has no serial number"),
        (
            {
                **base,
                "filesystems": [{"mount": str(fs.mount), "disk": "a"}, {"mount": str(fs.mount), "disk": "b"}],
            },
            "same filesystem",
        ),
        ({**base, "transport": {"driver": "carrier-pigeon"}}, "no transports driver named 'carrier-pigeon'"),
        ({**base, "transport": {"driver": "tcp", "port": 1}}, "exactly one of 'secret' and 'secret_file'"),
        ({**base, "capture": {"driver": "fsmap", "debounce": 1}}, "capture.debounce: unknown key"),
        (
            {**base, "spool": str(fs.mount / "lost+found" / "x" / "y"), "fence_max_lease_seconds": 90},
            "fence_max_lease_seconds",
        ),
    ]
    for config, expected in cases:
        result = run_agent(tmp_path, config)
        assert result.returncode == 2, (expected, result.stderr)
        assert expected in result.stderr, (expected, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2, result.stderr


def test_config_check_accepts_the_documented_agent_keys(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "transport: {driver: virtio-serial, name: org.vmreclaim.0}\n"
        "filesystems:\n  - {mount: /srv/data, disk: disk0}\n  - {mount: /}\n"
        "spool: /var/lib/vmreclaim-agent/spool\n"
        "capture: {driver: fiemap, events: inotify, debounce_seconds: 1, pending_seconds: 60}\n"
        "report_existing_free_space: false\nfence_max_lease_seconds: 5\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "vmreclaim", "config", "check", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
