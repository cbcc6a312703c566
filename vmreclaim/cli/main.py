"""The parser and the error boundary of ``vmreclaim``: usage errors and exit codes.

Errors go to stderr as one line; the exit code comes from the error's class
(:mod:`vmreclaim.core.errors`): 2 bad usage or configuration, a missing optional extra
or an absent daemon, 3 image busy, 4 image unsupported or corrupt, 1 anything unexpected
(a traceback only with ``--debug``). With ``--json`` anywhere on the command line an
error is one JSON document on stderr instead: ``{"error": "...", "exit": N}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from vmreclaim import __version__
from vmreclaim.cli import commands as cmd
from vmreclaim.cli import output
from vmreclaim.cli import reconcile as reconcile_commands
from vmreclaim.cli.ranges import non_negative
from vmreclaim.core.commands import COMMAND_DEST, CommandOutput
from vmreclaim.core.driver import AUTO
from vmreclaim.core.errors import VMReclaimError

Command = Callable[[argparse.Namespace], int]

#: Optional modules and the extra that installs each (``pip install 'vmreclaim[EXTRA]'``).
EXTRAS = {"libvirt": "kvm", "libvirt_qemu": "kvm", "XenAPI": "xen"}


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors honour ``--json`` (subparsers inherit the class)."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            report_error(f"{self.prog}: {message}", 2, as_json=True)
            sys.exit(2)
        super().error(message)


def report_error(message: str, code: int, *, as_json: bool) -> None:
    """One error on stderr: a line for people, or ``{"error", "exit"}`` with ``--json``."""
    if as_json:
        json.dump({"error": message, "exit": code}, sys.stderr)
        sys.stderr.write("\n")
    else:
        print(f"vmreclaim: error: {message}", file=sys.stderr)


def missing_extra(exc: ImportError) -> str:
    """What is missing and how to install it, from an ImportError of an optional module."""
    message = str(exc)
    if "pip install" in message:
        return message
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    hint = f"pip install 'vmreclaim[{extra}]'" if extra else f"install the Python module {top or '?'}"
    return f"missing optional dependency {top or message}: {hint}"


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = Parser(
        prog="vmreclaim",
        description="Give back to the host the space that files deleted inside VMs hold in their images.",
    )
    parser.add_argument("--version", action="version", version=f"vmreclaim {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("plugins", help="list installed drivers per kind, with their package")
    p.add_argument("--json", action="store_true", help="print the drivers and hook plugins as JSON")
    p.set_defaults(func=cmd.cmd_plugins)

    config = sub.add_parser("config", help="configuration files").add_subparsers(
        dest="config_command", metavar="SUBCOMMAND", required=True
    )
    p = config.add_parser(
        "check",
        help="validate a host or agent configuration file",
        description="Validate keys, driver names, format names and driver options (errors: exit 2, "
        "one FILE:LINE: key: problem per line); a disk image that does not exist is a warning "
        "(exit 0), since its VM may be created or migrated here later.",
    )
    p.add_argument("file", type=Path, help="the YAML configuration file")
    p.add_argument("--kind", choices=("agent", "host"), help="default: from the file's keys")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing when the file is valid")
    p.add_argument("--json", action="store_true", help='print {"file", "kind", "valid", "warnings"} as JSON')
    p.set_defaults(func=cmd.cmd_config_check)

    image = sub.add_parser("image", help="offline operations on image files").add_subparsers(
        dest="image_command", metavar="SUBCOMMAND", required=True
    )

    def image_parser(name: str, help: str, func: Command) -> argparse.ArgumentParser:
        p = image.add_parser(name, help=help)
        p.add_argument("image", type=Path, help="the image file")
        p.add_argument("--format", default=AUTO, help="format driver name (default: auto-detect)")
        p.add_argument("--json", action="store_true", help="print the result as one JSON document")
        p.set_defaults(func=func)
        return p

    image_parser("info", "format, sizes and backing chain", cmd.cmd_image_info)
    p = image_parser("map", "where each guest byte lives in the image file", cmd.cmd_image_map)
    p.add_argument(
        "--start", type=non_negative, default=0, help="first guest byte of the window (default: 0)"
    )
    p.add_argument(
        "--length", type=non_negative, default=None, help="bytes in the window (default: to the end)"
    )
    p = image_parser("reclaim", "punch guest byte ranges known to be free (offline)", cmd.cmd_image_reclaim)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--range",
        action="append",
        metavar="START:LENGTH",
        default=[],
        help="guest bytes to punch; repeatable; integers in bytes, decimal or 0x hex",
    )
    group.add_argument(
        "--ranges-file",
        type=Path,
        metavar="F",
        help="read the ranges from F ('-': stdin): either a JSON array [[START, LENGTH], ...], "
        "or one range per line as START:LENGTH or START LENGTH (decimal or 0x hex bytes); "
        "blank lines and text after '#' are ignored",
    )
    p.add_argument("--dry-run", action="store_true", help="plan and report, change nothing")
    p.add_argument(
        "--deep", action="store_true", help="also release clusters in the image's metadata (qcow2, offline)"
    )
    p = image_parser(
        "sparsify", "punch every free block of the guest filesystems (offline)", cmd.cmd_image_sparsify
    )
    p.add_argument("--dry-run", action="store_true", help="read and report, change nothing")

    p = sub.add_parser("host", help="run the host daemon")
    p.add_argument("--config", type=Path, required=True, help="the host configuration file")
    p.add_argument(
        "--confirm-format",
        metavar="PATH=FORMAT",
        action="append",
        help="the daemon stopped: confirm that the image PATH is now FORMAT, then exit",
    )
    p.set_defaults(func=cmd.cmd_host)

    p = sub.add_parser("agent", help="run the guest agent")
    p.add_argument("--config", type=Path, required=True, help="the agent configuration file")
    p.set_defaults(func=cmd.cmd_agent)

    _plugin_commands(sub)

    p = sub.add_parser("status", help="ask the running host daemon what it has reclaimed")
    p.add_argument("--json", action="store_true", help="print the daemon's status document as JSON")
    p.add_argument("--config", type=Path, default=None, help="host config (for its status_socket)")
    p.set_defaults(func=cmd.cmd_status)
    reconcile_commands.add_commands(sub)
    return parser


def _plugin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Subcommands that hook plugins add (``libvirt enable`` comes from the libvirt driver's)."""
    from vmreclaim.core.plugins import Plugins

    try:
        plugins = Plugins()
    except Exception:
        # A broken hook plugin must not take the whole command line down: the commands
        # that need hooks fail with its error, and `vmreclaim plugins` names it.
        return
    plugins.cli_add_commands(commands=sub)


def _run(args: argparse.Namespace) -> int:
    plugin_command = getattr(args, COMMAND_DEST, None)
    if plugin_command is None:
        code: int = args.func(args)
        return code
    result: CommandOutput = plugin_command(args)
    if getattr(args, "json", False):
        output.emit_json(result.doc)
    else:
        sys.stdout.write(result.text)
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Decided before parsing so that argparse's own usage errors honour it too.
    as_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    Parser.json_errors = as_json
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        return _run(args)
    except VMReclaimError as exc:
        report_error(str(exc), exc.exit_code, as_json=as_json)
        return exc.exit_code
    except ImportError as exc:
        # An optional extra (libvirt-python, XenAPI) that a command needs is not
        # installed: the host's setup, not a bug.
        if args.debug:
            raise
        report_error(missing_extra(exc), 2, as_json=as_json)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`vmreclaim image map --json | head`): not a bug. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again, and
        # exit as a process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as exc:
        if args.debug:
            raise
        elapsed = time.monotonic() - started
        what = f"unexpected error after {elapsed:.1f}s: {type(exc).__name__}: {exc}"
        if as_json:
            report_error(what, 1, as_json=True)
        else:
            hint = "this is a bug; run again with --debug for the traceback"
            print(f"vmreclaim: {what}\n{hint}", file=sys.stderr)
        return 1


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
