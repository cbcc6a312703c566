"""Every option of every command says what it does (``--help``, man pages, completion)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from vmreclaim.cli import build_parser


def walk(parser: argparse.ArgumentParser, prog: str = "vmreclaim") -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{prog} {name}")
        else:
            yield prog, action


def test_every_option_and_argument_has_help() -> None:
    missing = [
        f"{prog} {'/'.join(a.option_strings) or a.dest}"
        for prog, a in walk(build_parser())
        if not a.help or a.help == argparse.SUPPRESS
    ]
    assert not missing, f"options without help: {missing}"


def test_the_walk_sees_the_plugin_commands_too() -> None:
    progs = {prog for prog, _ in walk(build_parser())}
    assert "vmreclaim libvirt enable" in progs and "vmreclaim image reclaim" in progs


def test_ranges_file_help_documents_both_forms() -> None:
    helps = {"/".join(a.option_strings): a.help or "" for _, a in walk(build_parser())}
    text = helps["--ranges-file"]
    assert "[[START, LENGTH]" in text and "START:LENGTH" in text and "#" in text
