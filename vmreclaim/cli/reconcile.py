"""``vmreclaim reclaim VM`` and ``vmreclaim report``: the running daemon's control socket.

Both ask the daemon (DESIGN.md section 8) over its control socket, which lies beside
the ``status_socket`` of the host configuration (``--config``, else
``$VMRECLAIM_STATUS_SOCKET``, else ``/run/vmreclaim/status.sock``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from vmreclaim.cli import output


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reclaim", help="ask the running daemon to reconcile a VM now and reclaim")
    p.add_argument("vm", metavar="VM", help="the VM to reconcile and reclaim, by name")
    p.add_argument("--disk", metavar="ID", default=None, help="only this disk of the VM")
    p.add_argument("--dry-run", action="store_true", help="only say what is reclaimable")
    p.add_argument("--wait", action="store_true", help="return when the reclaim is done")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--config", type=Path, default=None, help="host config (for its sockets)")
    p.set_defaults(func=cmd_reclaim)

    p = sub.add_parser("report", help="per VM and disk: allocated, reclaimable, pending, freed")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--config", type=Path, default=None, help="host config (for its sockets)")
    p.set_defaults(func=cmd_report)


def _control(config: Path | None) -> Path:
    from vmreclaim.host.control import control_socket_path
    from vmreclaim.host.status import status_socket_path

    return control_socket_path(status_socket_path(config))


def cmd_reclaim(args: argparse.Namespace) -> int:
    from vmreclaim.host.control import ask

    request = {"op": "reclaim", "vm": args.vm, "disk": args.disk, "dry_run": args.dry_run, "wait": args.wait}
    # Long enough for the daemon's own reconcile timeout (at most an hour) and a punch.
    doc = ask(_control(args.config), request, timeout=3700.0)
    if args.json:
        output.emit_json(doc)
        return 0
    size = output.size
    rows = [
        (d["id"], size(d["reclaimable_bytes"]), size(d["punched_bytes"]), size(d["freed_bytes"]), d["mode"])
        for d in doc["disks"]
    ]
    verb = "dry run" if args.dry_run else ("done" if args.wait else "started")
    output.table(f"reclaim {doc['vm']} ({verb})", ("disk", "reclaimable", "punched", "freed", "mode"), rows)
    return 0


def _age(when: Any) -> str:
    if not isinstance(when, int | float):
        return "never"
    return f"{max(0.0, time.time() - when):.0f}s ago"


def cmd_report(args: argparse.Namespace) -> int:
    from vmreclaim.host.control import ask

    doc = ask(_control(args.config), {"op": "report"}, timeout=120.0)
    if args.json:
        output.emit_json(doc)
        return 0

    def size(n: Any) -> str:
        return output.size(n) if isinstance(n, int) else "?"

    rows = []
    for vm in doc["vms"]:
        for d in vm["disks"]:
            rows.append(
                (
                    vm["name"],
                    d["id"],
                    size(d["virtual_bytes"]),
                    size(d["allocated_bytes"]),
                    size(d["reclaimable_bytes"]),
                    _age(d["reclaimable_as_of"]),
                    size(d["pending_bytes"]),
                    size(d["freed_bytes"]),
                    d["mode"] or "-",
                    d.get("waiting") or "",
                )
            )
    output.table(
        "vmreclaim report",
        ("vm", "disk", "virtual", "allocated", "reclaimable", "as of", "pending", "freed", "mode", "waits"),
        rows,
    )
    return 0
