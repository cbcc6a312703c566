"""The ``vmreclaim`` command line (DESIGN.md section 8): argument parsing and output only.

Every command that reports takes ``--json`` and then prints exactly one JSON document on
stdout. Errors go to stderr as one line; the exit code comes from the error's class
(:mod:`vmreclaim.core.errors`): 2 bad usage or configuration, 3 image busy, 4 image
unsupported or corrupt, 1 anything unexpected (a traceback only with ``--debug``).
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
from typing import TYPE_CHECKING, Any

from vmreclaim import __version__
from vmreclaim.core.errors import RangeError, UsageError, VMReclaimError

if TYPE_CHECKING:
    from vmreclaim.core.ranges import RangeSet

# Commands import what they need inside their function: a short command such as
# `image map` then starts without pydantic, YAML or the daemons' modules.

#: ``--format`` default and ``format:`` value: probe the installed format drivers.
AUTO = "auto"

Command = Callable[[argparse.Namespace], int]


# -- output helpers ----------------------------------------------------------------------------


def _emit_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _console() -> Any:
    from rich.console import Console

    return Console()


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col in _NUMERIC else "left")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    _console().print(table)


_NUMERIC = {"start", "length", "offset", "bytes", "version"}


def _size(n: int) -> str:
    """Bytes for people: the exact integer plus a binary-prefixed approximation."""
    from vmreclaim.core.units import human_bytes

    return f"{n} B" if n < 1024 else f"{n} ({human_bytes(n)})"


# -- commands --------------------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    from vmreclaim.core import loader

    drivers = [d for kind in loader.KINDS for d in loader.installed(kind)]
    if args.json:
        _emit_json(
            {
                kind: [
                    {
                        "name": d.name,
                        "target": d.target,
                        "distribution": d.distribution,
                        "version": d.version,
                        "error": d.error,
                    }
                    for d in drivers
                    if d.kind == kind
                ]
                for kind in loader.KINDS
            }
        )
        return 0
    rows = [(d.kind, d.name, f"{d.distribution} {d.version}", d.target, d.error or "ok") for d in drivers]
    _table("vmreclaim drivers", ("kind", "name", "package", "target", "status"), rows)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from vmreclaim.core.config import CONFIG_KINDS, detect_kind, load_config

    kind = args.kind or detect_kind(args.file)
    load_config(args.file, CONFIG_KINDS[kind])
    if not args.quiet:
        print(f"{args.file}: valid {kind} configuration")
    return 0


def cmd_image_info(args: argparse.Namespace) -> int:
    from vmreclaim.core.image import open_image

    with open_image(args.image, args.format, writing=False) as image:
        info = image.info()
    if args.json:
        _emit_json(info)
        return 0
    rows = [(k, _size(v) if k in ("virtual_size", "allocated_bytes") else v) for k, v in info.items()]
    rows = [(k, ", ".join(v) or "none") if isinstance(v, list) else (k, v) for k, v in rows]
    _table(str(args.image), ("field", "value"), rows)
    return 0


def cmd_image_map(args: argparse.Namespace) -> int:
    from vmreclaim.core.image import open_image
    from vmreclaim.core.ranges import ByteRange

    with open_image(args.image, args.format, writing=False) as image:
        size = image.virtual_size
        start = args.start
        length = size - start if args.length is None else args.length
        window = ByteRange(start, length)
        if window.end > size:
            raise RangeError(f"map window {window} lies outside the virtual disk ({size} bytes)")
        extents = image.map(window).merged()
    if args.json:
        extents.write_json(sys.stdout)  # vectorised: maps can have 10^5-10^6 extents
        return 0
    rows = [(e["start"], e["length"], e["kind"], e["offset"]) for e in extents.to_json()]
    _table(f"{args.image} [{window.start}, {window.end})", ("start", "length", "kind", "offset"), rows)
    return 0


def cmd_image_reclaim(args: argparse.Namespace) -> int:
    from vmreclaim.core.image import open_image
    from vmreclaim.core.model import Disk
    from vmreclaim.core.pipeline import Pipeline

    ranges = _requested_ranges(args)
    with open_image(args.image, args.format) as image:
        disk = Disk(vm="", id=Path(args.image).name, path=Path(args.image), format=image.format_name)
        report = Pipeline().reclaim(disk, image, ranges, dry_run=args.dry_run, deep=args.deep)
    if args.json:
        _emit_json(report.to_json())
        return 0
    verb = "would punch" if report.dry_run else "punched"
    print(
        f"{args.image}: requested {_size(report.requested_bytes)}, {verb} "
        f"{_size(report.punched_bytes)}, freed {_size(report.freed_bytes)} ({report.mode} mode)"
    )
    if report.skipped:
        _table(
            "skipped",
            ("start", "length", "reason"),
            [(s.start, s.length, s.reason) for s in report.skipped],
        )
    return 0


def _requested_ranges(args: argparse.Namespace) -> RangeSet:
    from vmreclaim.core.ranges import RangeSet

    if args.ranges_file is not None:
        pairs = _read_ranges_file(args.ranges_file)
    else:
        pairs = [_parse_range(text) for text in args.range]
    if not pairs:
        raise RangeError("no ranges given: use --range START:LENGTH or --ranges-file")
    for start, length in pairs:
        if length <= 0:
            raise RangeError(f"range {start}:{length} is empty or negative")
    return RangeSet.from_ranges(pairs)


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise RangeError(f"{what} {text!r} is not an integer number of bytes") from None


def _parse_range(text: str) -> tuple[int, int]:
    start, sep, length = text.partition(":")
    if not sep:
        raise RangeError(f"range {text!r} is not START:LENGTH")
    return _parse_int(start, "range start"), _parse_int(length, "range length")


def _read_ranges_file(path: Path) -> list[tuple[int, int]]:
    """``[[start, length], ...]`` as JSON, or one ``START:LENGTH`` / ``START LENGTH`` per line."""
    try:
        text = path.read_text(encoding="utf-8") if str(path) != "-" else sys.stdin.read()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ranges file: {exc.strerror}") from exc
    if text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RangeError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        pairs = []
        for i, item in enumerate(doc):
            if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
                raise RangeError(f"{path}: item #{i} is not [start, length] of two integers")
            pairs.append((item[0], item[1]))
        return pairs
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(":", " ").split()
        if len(parts) != 2:
            raise RangeError(f"{path}:{lineno}: expected START:LENGTH, got {line!r}")
        pairs.append(
            (
                _parse_int(parts[0], f"{path}:{lineno}: start"),
                _parse_int(parts[1], f"{path}:{lineno}: length"),
            )
        )
    return pairs


def cmd_image_sparsify(args: argparse.Namespace) -> int:
    # Owned by the sparsify work (issue 5): vmreclaim.core.sparsify.sparsify_image.
    from vmreclaim.core.sparsify import sparsify_image

    report = sparsify_image(args.image, args.format, dry_run=args.dry_run, progress=not args.json)
    if args.json:
        _emit_json(report.to_json())
        return 0
    report.print_human(_console())
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    # Owned by the agent work (issue 6): vmreclaim.agent.main.run_agent.
    from vmreclaim.agent.main import run_agent
    from vmreclaim.core.config import AgentConfig, load_config

    return run_agent(load_config(args.config, AgentConfig))


def cmd_host(args: argparse.Namespace) -> int:
    # Owned by the host daemon work (issue 7): vmreclaim.host.daemon.run_host.
    from vmreclaim.core.config import HostConfig, load_config
    from vmreclaim.host.daemon import run_host

    return run_host(load_config(args.config, HostConfig))


def cmd_status(args: argparse.Namespace) -> int:
    # Owned by the host daemon work (issue 7): vmreclaim.host.status.
    from vmreclaim.host.status import print_status, query_status, status_socket_path

    doc = query_status(status_socket_path(args.config))
    if args.json:
        _emit_json(doc)
        return 0
    print_status(doc, _console())
    return 0


def cmd_libvirt_enable(args: argparse.Namespace) -> int:
    # Owned by the hypervisor work (issue 8): the libvirt driver's enable_channel.
    from vmreclaim.plugins.hypervisors.libvirt import enable_channel

    change = enable_channel(args.uri, args.domain, name=args.name, path=args.path, dry_run=args.dry_run)
    if args.json:
        _emit_json(
            {"domain": change.domain, "changed": change.changed, "applied": change.applied,
             "channel": change.channel_xml, "diff": change.diff}
        )  # fmt: skip
        return 0
    if not change.changed:
        print(f"{change.domain}: already has the {args.name} channel; nothing to change")
        return 0
    sys.stdout.write(change.diff)
    if change.applied:
        print(f"{change.domain}: channel {args.name} added to the persistent definition (from next start)")
    else:
        print(f"{change.domain}: dry run, nothing changed")
    return 0


# -- parser ------------------------------------------------------------------------------------


def _non_negative(text: str) -> int:
    value = _parse_int(text, "value")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmreclaim",
        description="Give back to the host the space that files deleted inside VMs hold in their images.",
    )
    parser.add_argument("--version", action="version", version=f"vmreclaim {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("plugins", help="list installed drivers per kind, with their package")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    config = sub.add_parser("config", help="configuration files").add_subparsers(
        dest="config_command", metavar="SUBCOMMAND", required=True
    )
    p = config.add_parser("check", help="validate a host or agent configuration file")
    p.add_argument("file", type=Path)
    p.add_argument("--kind", choices=("agent", "host"), help="default: from the file's keys")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_config_check)

    image = sub.add_parser("image", help="offline operations on image files").add_subparsers(
        dest="image_command", metavar="SUBCOMMAND", required=True
    )

    def image_parser(name: str, help: str, func: Command) -> argparse.ArgumentParser:
        p = image.add_parser(name, help=help)
        p.add_argument("image", type=Path)
        p.add_argument("--format", default=AUTO, help="format driver name (default: auto-detect)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
        return p

    image_parser("info", "format, sizes and backing chain", cmd_image_info)
    p = image_parser("map", "where each guest byte lives in the image file", cmd_image_map)
    p.add_argument("--start", type=_non_negative, default=0)
    p.add_argument("--length", type=_non_negative, default=None)
    p = image_parser("reclaim", "punch guest byte ranges known to be free (offline)", cmd_image_reclaim)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--range", action="append", metavar="START:LENGTH", default=[])
    group.add_argument("--ranges-file", type=Path, metavar="F")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument(
        "--deep", action="store_true", help="also release clusters in the image's metadata (qcow2, offline)"
    )
    p = image_parser(
        "sparsify", "punch every free block of the guest filesystems (offline)", cmd_image_sparsify
    )
    p.add_argument("--dry-run", action="store_true")

    p = sub.add_parser("host", help="run the host daemon")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_host)

    p = sub.add_parser("agent", help="run the guest agent")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_agent)

    libvirt = sub.add_parser("libvirt", help="libvirt domains").add_subparsers(
        dest="libvirt_command", metavar="SUBCOMMAND", required=True
    )
    p = libvirt.add_parser("enable", help="add the vmreclaim channel to a domain's persistent definition")
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument("--uri", default="qemu:///system", help="libvirt connection URI (default: qemu:///system)")
    p.add_argument("--name", default="org.vmreclaim.0", help="virtio-serial port name")
    p.add_argument("--path", default=None, help="host socket path (default: chosen by libvirt)")
    p.add_argument("--dry-run", action="store_true", help="print the change, do not make it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_libvirt_enable)

    p = sub.add_parser("status", help="ask the running host daemon what it has reclaimed")
    p.add_argument("--json", action="store_true")
    p.add_argument("--config", type=Path, default=None, help="host config (for its status_socket)")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        code: int = args.func(args)
        return code
    except VMReclaimError as exc:
        print(f"vmreclaim: error: {exc}", file=sys.stderr)
        return exc.exit_code
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
        print(
            f"vmreclaim: unexpected error after {elapsed:.1f}s: {type(exc).__name__}: {exc}\n"
            "this is a bug; run again with --debug for the traceback",
            file=sys.stderr,
        )
        return 1


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
