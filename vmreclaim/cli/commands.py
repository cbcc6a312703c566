"""The built-in commands: each parses nothing, calls the core or a runtime, and prints.

Commands import what they need inside their function: a short command such as
``image map`` then starts without pydantic, YAML or the daemons' modules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vmreclaim.cli import output
from vmreclaim.cli.ranges import requested_ranges
from vmreclaim.core.errors import RangeError


def cmd_plugins(args: argparse.Namespace) -> int:
    from vmreclaim.core import loader
    from vmreclaim.core.plugins import installed_hook_plugins

    drivers = [d for kind in loader.KINDS for d in loader.installed(kind)]
    hooks = installed_hook_plugins()
    if args.json:
        doc: dict[str, list[dict[str, Any]]] = {
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
        doc["hooks"] = [
            {
                "name": h.name,
                "target": h.target,
                "distribution": h.distribution,
                "version": h.version,
                "hooks": list(h.hooks),
                "error": h.error,
            }
            for h in hooks
        ]
        output.emit_json(doc)
        return 0
    rows = [(d.kind, d.name, f"{d.distribution} {d.version}", d.target, d.error or "ok") for d in drivers]
    output.table("vmreclaim drivers", ("kind", "name", "package", "target", "status"), rows)
    hook_rows = [
        (h.name, f"{h.distribution} {h.version}", "\n".join(h.hooks) or "none", h.error or "ok")
        for h in hooks
    ]
    output.table("vmreclaim hook plugins", ("name", "package", "hooks", "status"), hook_rows)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate (keys, driver names, format names, driver options), then look at the disks.

    A disk image that does not exist is a warning, not an error: a host config names the
    disks of VMs that may be created, restored or migrated here after the check, and the
    daemon handles a missing image per disk. Errors exit 2; warnings leave exit 0.
    """
    from vmreclaim.core.config import CONFIG_KINDS, detect_kind, load_config

    kind = args.kind or detect_kind(args.file)
    config = load_config(args.file, CONFIG_KINDS[kind])
    warnings = [
        f"{args.file}: {loc}: image {path} does not exist"
        for loc, path in _disk_paths(config, ())
        if not path.exists()
    ]
    if args.json:
        output.emit_json({"file": str(args.file), "kind": kind, "valid": True, "warnings": warnings})
        return 0
    for warning in warnings:
        print(f"vmreclaim: warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(f"{args.file}: valid {kind} configuration")
    return 0


def _disk_paths(node: Any, loc: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``(key.path, image path)`` of every disk in a validated config: any ``path`` under a
    ``disks`` list, in the core's blocks and in the drivers' own options alike."""
    from pydantic import BaseModel

    found: list[tuple[str, Path]] = []
    if isinstance(node, BaseModel):
        options = getattr(node, "_options", None)
        if isinstance(options, BaseModel):
            found += _disk_paths(options, loc)
        for name in type(node).model_fields:
            value = getattr(node, name)
            if name == "path" and "disks" in loc and isinstance(value, Path):
                found.append((".".join((*loc, name)), value))
            else:
                found += _disk_paths(value, (*loc, name))
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            found += _disk_paths(item, (*loc, str(i)))
    elif isinstance(node, dict):
        for key, item in node.items():
            found += _disk_paths(item, (*loc, str(key)))
    return found


def cmd_image_info(args: argparse.Namespace) -> int:
    from vmreclaim.core.opening import open_image

    with open_image(args.image, args.format, writing=False) as image:
        info = image.info()
    if args.json:
        output.emit_json(info)
        return 0
    rows = [(k, output.size(v) if k in ("virtual_size", "allocated_bytes") else v) for k, v in info.items()]
    rows = [(k, ", ".join(v) or "none") if isinstance(v, list) else (k, v) for k, v in rows]
    output.table(str(args.image), ("field", "value"), rows)
    return 0


def cmd_image_map(args: argparse.Namespace) -> int:
    from vmreclaim.core.opening import open_image
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
    output.table(f"{args.image} [{window.start}, {window.end})", ("start", "length", "kind", "offset"), rows)
    return 0


def cmd_image_reclaim(args: argparse.Namespace) -> int:
    from vmreclaim.core.model import Disk
    from vmreclaim.core.opening import open_image
    from vmreclaim.core.pipeline import Pipeline

    ranges = requested_ranges(args)
    with open_image(args.image, args.format) as image:
        disk = Disk(vm="", id=Path(args.image).name, path=Path(args.image), format=image.format_name)
        report = Pipeline().reclaim(disk, image, ranges, dry_run=args.dry_run, deep=args.deep)
    if args.json:
        doc = report.to_json()
        if report.dry_run:
            # DESIGN.md section 8 fixes "punched_bytes"; in a dry run nothing was punched,
            # so say beside it what the number is: bytes a real run would punch.
            doc["would_punch_bytes"] = doc["punched_bytes"]
        output.emit_json(doc)
        return 0
    verb = "would punch" if report.dry_run else "punched"
    size = output.size
    print(
        f"{args.image}: requested {size(report.requested_bytes)}, {verb} "
        f"{size(report.punched_bytes)}, freed {size(report.freed_bytes)} ({report.mode} mode)"
    )
    if report.skipped:
        output.table(
            "skipped",
            ("start", "length", "reason"),
            [(s.start, s.length, s.reason) for s in report.skipped],
        )
    return 0


def cmd_image_sparsify(args: argparse.Namespace) -> int:
    from vmreclaim.core.sparsify import sparsify_image

    if args.json:
        report = sparsify_image(args.image, args.format, dry_run=args.dry_run)
        output.emit_json(report.to_json())
        return 0
    with output.ProgressBar() as bar:
        report = sparsify_image(args.image, args.format, dry_run=args.dry_run, progress=bar)
    output.print_sparsify(report)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from vmreclaim.agent.main import run_agent
    from vmreclaim.core.config import AgentConfig, load_config

    return run_agent(load_config(args.config, AgentConfig))


def cmd_host(args: argparse.Namespace) -> int:
    from vmreclaim.core.config import HostConfig, load_config
    from vmreclaim.host.daemon import run_host

    config = load_config(args.config, HostConfig)
    if args.confirm_format:
        from vmreclaim.host.formats import confirm_format, parse_confirmation

        for text in args.confirm_format:
            path, fmt = parse_confirmation(text)
            old = confirm_format(config.database, path, fmt)
            print(f"{path}: format {fmt} confirmed (was {old or 'not recorded'})")
        return 0
    return run_host(config)


def cmd_status(args: argparse.Namespace) -> int:
    from vmreclaim.host.status import query_status, status_socket_path

    doc = query_status(status_socket_path(args.config))
    if args.json:
        output.emit_json(doc)
        return 0
    output.print_status(doc)
    return 0
