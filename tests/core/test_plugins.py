"""Drivers and hooks load through entry points, built-ins and third parties alike."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmreclaim import hookimpl
from vmreclaim.cli import main
from vmreclaim.core import hookspecs, loader
from vmreclaim.core.errors import DriverNotFoundError
from vmreclaim.core.image import open_image
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.plugins import Plugins
from vmreclaim.core.policies import Decision, DiskState, Policy, StorageState
from vmreclaim.core.punch import PunchResult
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing import make_disk, make_raw_image, make_record

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vmreclaim-example-plugin"
MIB = 1 << 20


def test_builtins_are_registered_as_entry_points() -> None:
    names = {(d.kind, d.name) for kind in loader.KINDS for d in loader.installed(kind)}
    assert {
        ("formats", "raw"),
        ("policies", "threshold"),
        ("policies", "always"),
        ("hypervisors", "static"),
        ("transports", "unix"),
    } <= names
    for kind in loader.KINDS:
        for d in loader.installed(kind):
            if d.distribution == "vmreclaim":
                # A backend whose optional extra is not installed says which extra to add.
                assert d.error is None or "pip install 'vmreclaim[" in d.error, f"{kind}/{d.name}: {d.error}"


def test_unknown_driver_names_the_installed_ones() -> None:
    with pytest.raises(DriverNotFoundError) as info:
        loader.load_driver("policies", "nope", Policy)
    assert "always" in str(info.value) and "threshold" in str(info.value)
    assert info.value.exit_code == 2


def test_plugins_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == set(loader.KINDS)
    raw = next(d for d in doc["formats"] if d["name"] == "raw")
    assert raw["distribution"] == "vmreclaim" and raw["error"] is None


# -- hooks ------------------------------------------------------------------------------------


SPECS = sorted(n for n in dir(hookspecs) if n.startswith("vmreclaim_"))


def test_every_hook_spec_is_documented() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name in SPECS:
        assert f"`{name}`" in docs, f"{name} is not documented in docs/plugins.md"
        spec = getattr(hookspecs, name)
        assert ":returns:" in spec.__doc__ and "versionadded" in spec.__doc__


class Recorder:
    """Implements every hook, narrowing where it may, and records each call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def vmreclaim_capture_filter(self, ranges: RangeSet) -> RangeSet:
        self.calls.append("capture_filter")
        return ranges.clip(ranges.bounds.__class__(0, 4096))

    @hookimpl
    def vmreclaim_verify_filter(self, mount: str, ranges: RangeSet) -> RangeSet | None:
        self.calls.append("verify_filter")
        return None

    @hookimpl
    def vmreclaim_record_received(self, record: object) -> None:
        self.calls.append("record_received")

    @hookimpl
    def vmreclaim_record_rejected(self, reason: str) -> None:
        self.calls.append("record_rejected")

    @hookimpl
    def vmreclaim_decide_veto(self, pending_bytes: int) -> str | None:
        self.calls.append("decide_veto")
        return "maintenance window" if pending_bytes > 100 else None

    @hookimpl
    def vmreclaim_translate_filter(self, plan: object) -> RangeSet:
        self.calls.append("translate_filter")
        return RangeSet([0], [MIB])  # never punch beyond the first MiB

    @hookimpl(wrapper=True)
    def vmreclaim_reclaim_punch(self) -> object:
        self.calls.append("reclaim_punch:before")
        result = yield
        self.calls.append("reclaim_punch:after")
        return result

    @hookimpl
    def vmreclaim_reclaim_done(self, report: object) -> None:
        self.calls.append("reclaim_done")


def test_every_hook_is_called_and_filters_only_narrow(tmp_path: Path) -> None:
    recorder = Recorder()
    pipeline = Pipeline(Plugins([recorder], load_entry_points=False))
    wide = RangeSet.from_ranges([(0, 8192)])
    assert pipeline.captured("/mnt", "/dev/vda1", wide).to_pairs() == [[0, 4096]]
    assert pipeline.verified("/mnt", "/dev/vda1", wide) == wide
    vm = make_record([(0, 1)]).vm
    from vmreclaim.core.model import VMIdentity

    pipeline.plugins.record_received(vm=VMIdentity(vm), record=make_record([(0, 1)]))
    pipeline.plugins.record_rejected(vm=VMIdentity(vm), reason="bad")

    img = make_raw_image(tmp_path / "d.raw", 4 * MIB, [(0, 4 * MIB)])
    disk = make_disk(img)

    class Yes(Policy):
        def decide(self, disk: DiskState, storage: StorageState, now: float) -> Decision:
            return Decision(True, "yes")

    vetoed = pipeline.decide(disk, Yes(), DiskState("k", 1, 1000), StorageState(1, 1), 0)
    assert not vetoed.reclaim and "maintenance window" in vetoed.reason
    assert pipeline.decide(disk, Yes(), DiskState("k", 1, 10), StorageState(1, 1), 0).reclaim

    with open_image(img) as image:
        report = pipeline.reclaim(disk, image, RangeSet.from_ranges([(0, 2 * MIB)]))
    assert report.punched_bytes == MIB  # the translate filter kept only the first MiB
    assert any(s.reason == "vetoed by a plugin" and s.start == MIB for s in report.skipped)
    assert os.stat(img).st_blocks * 512 == 3 * MIB
    expected = {
        "capture_filter",
        "verify_filter",
        "record_received",
        "record_rejected",
        "decide_veto",
        "translate_filter",
        "reclaim_punch:before",
        "reclaim_punch:after",
        "reclaim_done",
    }
    assert expected == set(recorder.calls)
    hooks_seen = {c.split(":")[0] for c in recorder.calls}
    # Every pipeline hook; the CLI's hook is exercised by tests/core/test_cli_package.py.
    assert {f"vmreclaim_{h}" for h in hooks_seen} == set(SPECS) - {"vmreclaim_cli_add_commands"}


def test_a_plugin_can_replace_the_punch(tmp_path: Path) -> None:
    class ArrayUnmap:
        @hookimpl
        def vmreclaim_reclaim_punch(self, plan: object) -> PunchResult:
            return PunchResult(punched_bytes=0, freed_bytes=0)

    img = make_raw_image(tmp_path / "d.raw", MIB, [(0, MIB)])
    with open_image(img) as image:
        report = Pipeline(Plugins([ArrayUnmap()], load_entry_points=False)).reclaim(
            make_disk(img), image, RangeSet.from_ranges([(0, MIB)])
        )
    assert report.punched_bytes == 0 and os.stat(img).st_blocks * 512 == MIB


def test_misspelt_hook_fails_at_start() -> None:
    class Typo:
        @hookimpl
        def vmreclaim_reclaim_dun(self) -> None: ...

    with pytest.raises(Exception, match="vmreclaim_reclaim_dun"):
        Plugins([Typo()], load_entry_points=False)


# -- a third-party package, installed for real ----------------------------------------------


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv that sees this vmreclaim and has the example plugin pip-installed."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
    )
    proc = subprocess.run(
        [
            venv / "bin" / "python",
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return venv


def run_in(venv: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv / "bin" / "python", "-m", "vmreclaim", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_third_party_plugin_is_listed_and_loads_like_a_builtin(plugin_venv: Path, tmp_path: Path) -> None:
    proc = run_in(plugin_venv, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {d["name"]: d for d in json.loads(proc.stdout)["policies"]}
    assert listed["quiet-hours"]["distribution"] == "vmreclaim-example-plugin"
    assert listed["quiet-hours"]["version"] == "1.0.0" and listed["quiet-hours"]["error"] is None

    config = tmp_path / "host.yaml"
    config.write_text(
        "hypervisor: {driver: static, vms: [{name: vm1, disks: [{id: d0, path: /x.raw}],"
        " channel: {driver: unix, path: /run/x.sock}}]}\n"
        "policy: {driver: quiet-hours, busy_from: 9, busy_until: 17}\n"
        "database: /tmp/db\nstatus_socket: /tmp/s\n"
    )
    assert run_in(plugin_venv, "config", "check", str(config)).returncode == 0
    config.write_text(config.read_text().replace("busy_until: 17", "busy_untill: 17"))
    bad = run_in(plugin_venv, "config", "check", str(config))
    assert bad.returncode == 2 and re.search(r":2: policy.busy_untill: unknown key", bad.stderr)

    img = make_raw_image(tmp_path / "d.raw", MIB, [(0, MIB)])
    audit = tmp_path / "audit.jsonl"
    done = run_in(
        plugin_venv,
        "image",
        "reclaim",
        str(img),
        "--range",
        f"0:{MIB}",
        "--json",
        env={"VMRECLAIM_AUDIT_LOG": str(audit)},
    )
    assert done.returncode == 0, done.stderr
    (line,) = audit.read_text().splitlines()
    assert json.loads(line)["punched_bytes"] == MIB
