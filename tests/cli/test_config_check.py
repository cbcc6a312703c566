"""``vmreclaim config check``: driver and format names, image paths, required keys."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from vmreclaim.core.config import HostConfig

DOCS = Path(__file__).resolve().parents[2] / "docs" / "host.md"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmreclaim.cli", "config", "check", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def host_yaml(tmp_path: Path, image: Path, fmt: str = "raw", drop: str = "", driver: str = "static") -> Path:
    doc = {
        "hypervisor": {
            "driver": driver,
            "vms": [
                {
                    "name": "vm1",
                    "channel": {"driver": "unix", "path": str(tmp_path / "vm1.sock")},
                    "disks": [{"id": "d0", "path": str(image), "format": fmt}],
                }
            ],
        },
        "database": str(tmp_path / "db.sqlite"),
        "status_socket": str(tmp_path / "status.sock"),
    }
    doc.pop(drop, None)
    path = tmp_path / "host.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_valid_config_with_json(tmp_path: Path) -> None:
    image = tmp_path / "vm1.img"
    image.write_bytes(b"\0" * 4096)
    r = check(str(host_yaml(tmp_path, image)), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "file": str(tmp_path / "host.yaml"),
        "kind": "host",
        "valid": True,
        "warnings": [],
    }


def test_unknown_format_is_an_error_naming_the_installed_ones(tmp_path: Path) -> None:
    r = check(str(host_yaml(tmp_path, tmp_path / "x.img", fmt="qcow")), "--json")
    assert r.returncode == 2
    error = json.loads(r.stderr)["error"]
    assert "'qcow'" in error and "qcow2" in error and "raw" in error
    assert re.search(r"host\.yaml:\d+: hypervisor\.vms\.0\.disks\.0\.format", error)


def test_unknown_driver_is_an_error(tmp_path: Path) -> None:
    r = check(str(host_yaml(tmp_path, tmp_path / "x.img", driver="vmware")))
    assert r.returncode == 2
    assert "'vmware'" in r.stderr and "static" in r.stderr


def test_a_missing_image_is_a_warning_not_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet" / "vm1.qcow2"
    r = check(str(host_yaml(tmp_path, missing)), "--json")
    assert r.returncode == 0, r.stderr
    warnings = json.loads(r.stdout)["warnings"]
    assert len(warnings) == 1 and str(missing) in warnings[0] and "disks.0.path" in warnings[0]
    r = check(str(host_yaml(tmp_path, missing)))
    assert r.returncode == 0
    assert f"image {missing} does not exist" in r.stderr


def test_database_and_status_socket_are_required(tmp_path: Path) -> None:
    for key in ("database", "status_socket"):
        r = check(str(host_yaml(tmp_path, tmp_path / "x.img", drop=key)), "--kind", "host")
        assert r.returncode == 2
        assert f"{key}: missing required key" in r.stderr


def test_docs_host_md_agrees_on_what_is_required() -> None:
    """The keys docs/host.md lists as optional have defaults; the required ones none."""
    text = DOCS.read_text()
    section = text.split("### Configuration")[1]
    required_block, optional_block = re.findall(r"```yaml\n(.*?)```", section, re.S)[:2]
    required = set(yaml.safe_load(required_block))
    optional = set(yaml.safe_load(optional_block))
    fields = HostConfig.model_fields
    assert required == {k for k, f in fields.items() if f.is_required()}
    assert optional <= {k for k, f in fields.items() if not f.is_required()}
