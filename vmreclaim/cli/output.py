"""Every byte ``vmreclaim`` prints for people or programs: JSON, rich tables, progress.

The core and the runtimes return data (reports, the status document); this module turns
it into output. ``rich`` is imported only when a table or a bar is drawn, so a command
run with ``--json`` never loads it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmreclaim.core.filesystems import ProgressCallback
    from vmreclaim.core.sparsify import SparsifyReport

#: Columns printed right-aligned (numbers).
_NUMERIC = {"start", "length", "offset", "bytes", "version"}


def emit_json(doc: Any) -> None:
    """One JSON document on stdout, the ``--json`` contract (DESIGN.md section 8)."""
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


#: Width of the console when stdout is not a terminal: wide enough that rich never
#: truncates or wraps a cell (a table is as wide as its content, not as this).
PIPE_WIDTH = 1 << 15


def console() -> Any:
    """A rich console on stdout; piped, it never truncates a table to 80 columns."""
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        out = Console(width=PIPE_WIDTH)
    return out


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    # Cells are data, never markup: `pip install 'vmreclaim[kvm]'` keeps its brackets.
    tbl = Table(title=escape(title))
    for col in columns:
        tbl.add_column(col, justify="right" if col in _NUMERIC else "left")
    for row in rows:
        tbl.add_row(*("" if v is None else escape(str(v)) for v in row))
    console().print(tbl)


def size(n: int) -> str:
    """Bytes for people: the exact integer plus a binary-prefixed approximation."""
    from vmreclaim.core.units import human_bytes

    return f"{n} B" if n < 1024 else f"{n} ({human_bytes(n)})"


# -- image sparsify ------------------------------------------------------------------------

#: What each skip reason of the reclaim plan means to someone reading the summary.
_REASONS = {
    "zero": "already reads as zeros (holes or zero clusters)",
    "unallocated": "not stored in this image (holes, or data of its backing file)",
    "partial-block": "shares a host block with data in use",
    "hole": "stored in this image, but its host bytes are already a hole",
    "shared": "in clusters shared with a snapshot",
    "compressed": "in compressed clusters",
}


def print_sparsify(report: SparsifyReport) -> None:
    """A sparsify report as a table of volumes and a summary line."""
    from rich.table import Table

    from vmreclaim.core.units import human_bytes

    out = console()
    tbl = Table(title=f"{report.image} ({report.format})")
    for col, right in (
        ("partition", False),
        ("start", True),
        ("size", True),
        ("type", False),
        ("block", True),
        ("free", True),
        ("status", False),
    ):
        tbl.add_column(col, justify="right" if right else "left")
    for f in report.filesystems:
        v = f.volume
        tbl.add_row(
            v.label,
            str(v.start),
            human_bytes(v.length),
            f.type or "?",
            str(f.block_size or ""),
            human_bytes(f.free_bytes) if f.skipped is None else "",
            f"skipped: {f.skipped}" if f.skipped else "read",
        )
    out.print(tbl)
    verb = "would punch" if report.dry_run else "punched"
    line = f"free {human_bytes(report.free_bytes)}, {verb} {human_bytes(report.punched_bytes)}"
    if not report.dry_run:
        line += f", freed {human_bytes(report.freed_bytes)} of host storage"
    out.print(f"{line} in {report.seconds:.2f} s")
    if report.estimate:
        out.print(
            "ESTIMATE: the image is in use (a writer holds it); its filesystems were read as "
            "they stand on disk, which lags a mounted filesystem. Nothing was changed; stop the "
            "VM for exact numbers, or use `vmreclaim reclaim VM --dry-run` with an agent."
        )
    for reason, n in sorted(report.not_punched.items()):
        why = _REASONS.get(reason, reason)
        out.print(f"  free but not punched: {human_bytes(n)} {why}")


class ProgressBar:
    """A rich progress bar on stderr, drawn only when stderr is a terminal.

    Passed to :func:`vmreclaim.core.sparsify.sparsify_image` as its ``progress``: the
    core asks for one ``(done, total)`` callback per stage and never sees rich.
    """

    def __init__(self) -> None:
        self._bar: Any = None
        from rich.console import Console

        err = Console(stderr=True)
        if err.is_terminal:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=err,
                transient=False,
            )

    def __enter__(self) -> ProgressBar:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def stage(self, description: str, *, pulse: bool = False) -> ProgressCallback:
        """A callback ``(done, total)`` that moves a new task of the bar."""
        bar = self._bar
        if bar is None:
            return _ignore
        task = bar.add_task(description, total=None if pulse else 1)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return update


def _ignore(done: int, total: int) -> None:
    return None


# -- status --------------------------------------------------------------------------------


def _status_size(n: int | None) -> str:
    from vmreclaim.core.units import human_bytes

    return "-" if n is None else human_bytes(n)


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, now - when)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when))


def print_status(doc: dict[str, Any]) -> None:
    """The host daemon's status document as tables, for people."""
    from rich.markup import escape
    from rich.table import Table

    out = console()
    now = time.time()
    policy = doc.get("policy", {})
    state = ", ".join(f"{k}={v}" for k, v in policy.items() if k != "driver")
    out.print(
        f"vmreclaim host {doc.get('version', '?')}, up {doc.get('uptime_seconds', 0):.0f}s; "
        f"policy [bold]{escape(str(policy.get('driver', '?')))}[/bold]"
        + (f" ({escape(state)})" if state else "")
        + f"; rejected records: {doc.get('rejected_records', 0)}"
    )
    tbl = Table()
    for col in ("vm", "agent", "disk", "pending", "punched", "freed", "last reclaim", "state"):
        tbl.add_column(col, justify="right" if col in ("pending", "punched", "freed") else "left")
    for vm in doc.get("vms", []):
        agent = vm.get("agent") or {}
        who = "connected" if agent.get("connected") else "-"
        running = "running" if vm.get("running") else "stopped"
        disks = vm.get("disks", []) or [{}]
        for i, disk in enumerate(disks):
            tbl.add_row(
                escape(f"{vm.get('name')} ({running})") if i == 0 else "",
                who if i == 0 else "",
                escape(str(disk.get("id", ""))),
                _status_size(disk.get("pending_bytes")),
                _status_size(disk.get("punched_bytes")),
                _status_size(disk.get("freed_bytes")),
                _ago(disk.get("last_reclaim"), now),
                str(disk.get("state", "")),
            )
    out.print(tbl)
