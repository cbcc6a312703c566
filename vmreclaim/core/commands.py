"""What a plugin's own subcommand gives the command line to print.

A plugin adds subcommands to ``vmreclaim`` through the hook
:func:`~vmreclaim.core.hookspecs.vmreclaim_cli_add_commands` (as tox plugins add options
through ``tox_add_option``); the CLI package owns every byte of output, so the plugin's
command returns a :class:`CommandOutput` and the CLI prints it: the JSON document with
``--json``, the text otherwise.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The ``argparse`` default under which :func:`set_command` stores a plugin command.
COMMAND_DEST = "_vmreclaim_plugin_command"


@dataclass(frozen=True)
class CommandOutput:
    """A plugin command's result: ``doc`` for ``--json``, ``text`` for people."""

    doc: Any
    text: str
    exit_code: int = 0


PluginCommand = Callable[[argparse.Namespace], CommandOutput]


def set_command(parser: argparse.ArgumentParser, command: PluginCommand) -> None:
    """Make ``command`` run when the subcommand ``parser`` is chosen."""
    parser.set_defaults(**{COMMAND_DEST: command})
