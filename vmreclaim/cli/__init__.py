"""The ``vmreclaim`` command line (DESIGN.md section 8): argument parsing and output only.

Every command that reports takes ``--json`` and then prints exactly one JSON document on
stdout. The package owns every byte printed: the core and the runtimes return data, and
:mod:`vmreclaim.cli.output` renders it. Plugins add subcommands through the hook
``vmreclaim_cli_add_commands``.

* :mod:`vmreclaim.cli.main` — the parser, the error boundary and the exit codes;
* :mod:`vmreclaim.cli.commands` — the built-in commands;
* :mod:`vmreclaim.cli.ranges` — ``--range`` and ranges files;
* :mod:`vmreclaim.cli.output` — JSON, tables, progress bars, the status tables.
"""

from __future__ import annotations

from vmreclaim.cli.main import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
