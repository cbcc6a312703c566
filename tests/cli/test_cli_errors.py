"""Exit codes, ``--json`` errors and piped tables of the real ``vmreclaim`` executable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest


def vmreclaim(
    *args: str, env: dict[str, str] | None = None, shim: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, **(env or {}))
    if shim is not None:
        full["PYTHONPATH"] = f"{shim}{os.pathsep}{full.get('PYTHONPATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "vmreclaim.cli", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
    )


@pytest.fixture
def no_extras(tmp_path: Path) -> Path:
    """A directory that, first on sys.path, makes libvirt-python and XenAPI absent
    even on a host where they are installed."""
    shim = tmp_path / "shim"
    shim.mkdir()
    for module in ("libvirt", "XenAPI"):
        (shim / f"{module}.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n"
        )
    return shim


def test_libvirt_enable_without_libvirt_python_is_exit_2_naming_the_extra(no_extras: Path) -> None:
    r = vmreclaim("libvirt", "enable", "some-domain", shim=no_extras)
    assert r.returncode == 2, r.stderr
    assert "pip install 'vmreclaim[kvm]'" in r.stderr
    assert "bug" not in r.stderr


def test_missing_extra_with_json_is_a_json_error(no_extras: Path) -> None:
    r = vmreclaim("libvirt", "enable", "some-domain", "--json", shim=no_extras)
    assert r.returncode == 2
    assert r.stdout == ""
    doc = json.loads(r.stderr)
    assert doc["exit"] == 2 and "vmreclaim[kvm]" in doc["error"]


def test_plugins_table_keeps_the_brackets_of_the_extra(no_extras: Path) -> None:
    r = vmreclaim("plugins", shim=no_extras)
    assert r.returncode == 0, r.stderr
    assert "pip install 'vmreclaim[xen]'" in r.stdout
    assert "pip install 'vmreclaim[kvm]'" in r.stdout


def test_status_without_a_daemon_is_exit_2_naming_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    r = vmreclaim("status", env={"VMRECLAIM_STATUS_SOCKET": str(path)})
    assert r.returncode == 2, r.stderr
    assert str(path) in r.stderr


def test_status_on_a_dead_socket_is_exit_2(tmp_path: Path) -> None:
    """A socket file left behind by a daemon that died: connection refused."""
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # bound, never listening: connect() is refused
    r = vmreclaim("status", "--json", env={"VMRECLAIM_STATUS_SOCKET": str(path)})
    assert r.returncode == 2
    assert r.stdout == ""
    doc = json.loads(r.stderr)
    assert doc == {"error": doc["error"], "exit": 2} and str(path) in doc["error"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["image", "info", "/nonexistent/disk.qcow2", "--json"], None),
        (["image", "map", "--json", "x.img", "--start", "-5"], 2),  # argparse's own error
        (["image", "reclaim", "x.img", "--range", "nonsense", "--json"], None),
        (["plugins", "--json", "--no-such-option"], 2),
    ],
)
def test_errors_with_json_are_one_json_document_on_stderr(
    tmp_path: Path, args: list[str], code: int | None
) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vmreclaim.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode != 0
    assert r.stdout == ""
    doc = json.loads(r.stderr)
    assert set(doc) == {"error", "exit"}
    assert doc["exit"] == r.returncode
    if code is not None:
        assert r.returncode == code
    assert doc["error"]


def test_config_check_error_with_json(tmp_path: Path) -> None:
    cfg = tmp_path / "host.yaml"
    cfg.write_text("vms: [\n")
    r = vmreclaim("config", "check", str(cfg), "--json")
    assert r.returncode == 2
    assert json.loads(r.stderr)["exit"] == 2


def _serve_status(path: Path, doc: dict[str, Any]) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(64)
            conn.sendall(json.dumps(doc).encode())

    threading.Thread(target=answer, daemon=True).start()
    return server


def test_status_table_is_not_truncated_when_piped(tmp_path: Path) -> None:
    name = "a-virtual-machine-with-a-very-long-name-" + "x" * 120
    doc = {
        "version": "0.1.0",
        "uptime_seconds": 3,
        "policy": {"driver": "always"},
        "vms": [{"name": name, "running": True, "disks": [{"id": "vda[0]", "pending_bytes": 1}]}],
    }
    path = tmp_path / "s.sock"
    server = _serve_status(path, doc)
    try:
        r = vmreclaim("status", env={"VMRECLAIM_STATUS_SOCKET": str(path), "COLUMNS": "80"})
    finally:
        server.close()
    assert r.returncode == 0, r.stderr
    assert name in r.stdout  # whole, on one line
    assert "vda[0]" in r.stdout  # data, not rich markup


def test_a_xen_host_config_without_xenapi_is_exit_2_naming_the_extra(tmp_path: Path, no_extras: Path) -> None:
    cfg = tmp_path / "host.yaml"
    cfg.write_text(
        f"hypervisor: {{driver: xen}}\ndatabase: {tmp_path}/db.sqlite\nstatus_socket: {tmp_path}/s.sock\n"
    )
    for args in (("config", "check", str(cfg)), ("host", "--config", str(cfg))):
        r = vmreclaim(*args, shim=no_extras)
        assert r.returncode == 2, r.stderr
        assert "pip install 'vmreclaim[xen]'" in r.stderr
