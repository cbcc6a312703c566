"""Committed man pages and completion files are what the parser generates, and work."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmreclaim.cli.manpages import generated

ROOT = Path(__file__).resolve().parents[2]


def test_committed_files_match_the_parser() -> None:
    """Regenerate with: python -m vmreclaim.cli.manpages ."""
    files = generated()
    stale = [
        rel for rel, text in files.items() if not (ROOT / rel).is_file() or (ROOT / rel).read_text() != text
    ]
    assert not stale, f"regenerate with `python -m vmreclaim.cli.manpages .`: {stale}"
    committed = {f"man/{p.name}" for p in (ROOT / "man").glob("*.1")}
    assert committed == {rel for rel in files if rel.startswith("man/")}
    assert {"man/vmreclaim.1", "man/vmreclaim-image-reclaim.1", "man/vmreclaim-config-check.1"} <= committed


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_man_pages_render_without_warnings() -> None:
    for page in (ROOT / "man").glob("*.1"):
        r = subprocess.run(
            ["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0 and r.stderr == "", (page, r.stderr)


def complete(line: str) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end), from the shipped file."""
    words = line.split(" ")
    script = (
        f"source {ROOT / 'completion' / 'vmreclaim.bash'}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        "_vmreclaim; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bash_completion_offers_commands_and_options() -> None:
    assert set(complete("vmreclaim im")) == {"image"}
    assert set(complete("vmreclaim image ")) == {"info", "map", "reclaim", "sparsify"}
    assert "--ranges-file" in complete("vmreclaim image reclaim disk.raw --ra")
    assert set(complete("vmreclaim config check --")) >= {"--json", "--kind", "--quiet"}


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh not installed")
def test_zsh_completion_parses() -> None:
    r = subprocess.run(
        ["zsh", "-n", str(ROOT / "completion" / "_vmreclaim")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
