"""The CLI package owns all output; plugins add commands through a hook, not an import."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmreclaim import hookimpl
from vmreclaim.cli import build_parser, main
from vmreclaim.core.commands import CommandOutput, set_command
from vmreclaim.core.plugins import Plugins

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vmreclaim"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any level (function bodies and TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_cli_imports_no_driver() -> None:
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        plugins = {m for m in imported_modules(path) if m.startswith("vmreclaim.plugins")}
        assert not plugins, f"{path.name} imports {plugins}: drivers reach the CLI through hooks"


def test_only_the_cli_renders() -> None:
    """rich is the CLI's: the core, the runtimes and the plugins return data."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("cli", "testing"):
            continue
        uses = {m for m in imported_modules(path) if m == "rich" or m.startswith("rich.")}
        assert not uses, f"vmreclaim/{rel} imports {uses}; rendering belongs in vmreclaim/cli"


def test_building_the_parser_does_not_load_the_libvirt_driver() -> None:
    code = (
        "import sys\n"
        "from vmreclaim.cli import build_parser\n"
        "build_parser().parse_args(['libvirt', 'enable', 'dom', '--dry-run'])\n"
        "print(sorted(m for m in sys.modules if m.startswith(('vmreclaim.plugins', 'libvirt'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(proc.stdout.replace("'", '"'))
    assert "vmreclaim.plugins.hypervisors.libvirt_commands" in loaded
    assert "vmreclaim.plugins.hypervisors.libvirt" not in loaded and "libvirt" not in loaded


def test_libvirt_enable_comes_from_the_drivers_hook_with_the_same_options() -> None:
    args = build_parser().parse_args(["libvirt", "enable", "dom", "--uri", "test:///default", "--json"])
    assert (args.domain, args.uri, args.name, args.path, args.dry_run, args.json) == (
        "dom",
        "test:///default",
        "org.vmreclaim.0",
        None,
        False,
        True,
    )


class Hello:
    """A third-party command: it returns data, the CLI prints it."""

    @hookimpl
    def vmreclaim_cli_add_commands(
        self, commands: argparse._SubParsersAction[argparse.ArgumentParser]
    ) -> None:
        p = commands.add_parser("hello", help="say hello")
        p.add_argument("who")
        p.add_argument("--json", action="store_true")
        set_command(p, self.run)

    def run(self, args: argparse.Namespace) -> CommandOutput:
        return CommandOutput({"greeting": f"hello {args.who}"}, f"hello {args.who}\n", exit_code=5)


@pytest.fixture
def hello_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plugins() of the CLI process with the Hello plugin registered as an entry point would be."""
    real = Plugins.__init__

    def with_hello(self: Plugins, plugins: object = (), *, load_entry_points: bool = True) -> None:
        real(self, [*plugins, Hello()], load_entry_points=load_entry_points)  # type: ignore[misc]

    monkeypatch.setattr(Plugins, "__init__", with_hello)


def test_a_plugin_command_prints_text_or_json_through_the_cli(
    hello_plugin: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["hello", "world"]) == 5
    assert capsys.readouterr().out == "hello world\n"
    assert main(["hello", "world", "--json"]) == 5
    assert json.loads(capsys.readouterr().out) == {"greeting": "hello world"}


def test_a_broken_hook_plugin_does_not_take_down_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(self: Plugins, *args: object, **kwargs: object) -> None:
        raise ImportError("vmreclaim_broken: no module named 'missing'")

    monkeypatch.setattr(Plugins, "__init__", broken)
    assert main(["plugins", "--json"]) == 0
    assert "formats" in json.loads(capsys.readouterr().out)


def test_plugins_lists_a_broken_hook_plugin_with_its_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.metadata

    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint("broken-audit", "vmreclaim_no_such_module_xyz", "vmreclaim.hooks")

    def entry_points(**kwargs: str) -> object:
        found = real(**kwargs)
        return [*found, broken] if kwargs.get("group") == "vmreclaim.hooks" else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert main(["plugins", "--json"]) == 0
    hooks = {h["name"]: h for h in json.loads(capsys.readouterr().out)["hooks"]}
    assert hooks["broken-audit"]["hooks"] == []
    assert "vmreclaim_no_such_module_xyz" in hooks["broken-audit"]["error"]
    assert hooks["libvirt"]["error"] is None
