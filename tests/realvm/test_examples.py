"""Every shipped example config loads with ``vmreclaim config check``, as an operator
would run it (issue 21 item 4: example configs that work as shipped).

A host config whose hypervisor driver needs an extra (libvirt-python, XenAPI) is checked
where that extra is installed (tox envs kvm and xen) and skipped elsewhere; the libvirt
pair is also what the real-VM test (``tests/realvm/test_debian_vm.py``) deploys.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(p for p in EXAMPLES.glob("*/*.yaml"))
#: Which import each hypervisor driver needs beyond the core dependencies.
EXTRA_MODULE = {"libvirt": "libvirt", "xen": "XenAPI"}


def test_there_is_a_pair_per_hypervisor() -> None:
    kinds = {p.parent.name for p in CONFIGS}
    assert {"libvirt", "qemu", "xen", "static"} <= kinds
    for kind in kinds:
        assert (EXAMPLES / kind / "host.yaml").exists(), kind
        assert (EXAMPLES / kind / "agent.yaml").exists(), kind


def test_every_transport_has_an_agent_example() -> None:
    drivers = set()
    for path in CONFIGS:
        doc = yaml.safe_load(path.read_text())
        if "transport" in doc:
            drivers.add(doc["transport"]["driver"])
    assert drivers == {"unix", "virtio-serial", "vsock", "tcp"}


def _param(path: Path) -> object:
    """Host configs of a driver with an extra also run in that extra's tox env."""
    mark = {"libvirt": pytest.mark.kvm, "xen": pytest.mark.xen}.get(path.parent.name)
    marks = [mark] if mark is not None and path.name == "host.yaml" else []
    return pytest.param(path, marks=marks, id=f"{path.parent.name}/{path.name}")


@pytest.mark.parametrize("path", [_param(p) for p in CONFIGS])
def test_example_passes_config_check(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    driver = doc.get("hypervisor", {}).get("driver")
    module = EXTRA_MODULE.get(driver or "")
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(
            f"the {driver} driver needs {module} (tox env {'kvm' if driver == 'libvirt' else driver})"
        )
    proc = subprocess.run(
        [sys.executable, "-m", "vmreclaim", "config", "check", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout


def test_config_check_still_refuses_a_broken_example(tmp_path: Path) -> None:
    """The check above could pass vacuously if config check accepted anything."""
    bad = tmp_path / "agent.yaml"
    bad.write_text(
        (EXAMPLES / "libvirt" / "agent.yaml").read_text().replace("virtio-serial", "virtio-serail")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "vmreclaim", "config", "check", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "virtio-serail" in proc.stderr
