#!/usr/bin/env python3
"""Real guest: vmreclaim vs one ``fstrim`` vs ``mount -o discard`` (issue 8).

The same workload runs in the same TCG guest (Debian's kernel, the checkout's agent; see
``vmreclaim.testing.guest``) once per way of giving space back, for each image format:

* ``vmreclaim`` — the agent in the guest and ``vmreclaim host`` (libvirt driver when
  libvirtd runs, else qemu) with the ``always`` policy; qcow2 is attached with
  discard=unmap (guest-trim mode), raw and VHD without (fenced host punch);
* ``fstrim`` — no agent; the disk has discard=unmap and the guest runs ``fstrim`` once
  right after the deletions;
* ``discard-mount`` — no agent; discard=unmap and the filesystem mounted ``-o discard``.

The workload writes N files of M MiB of random data (fsync, sync), then deletes them
(sync), while a checker process rewrites and verifies files of its own. Measured: bytes
deleted, bytes the image file gave back (allocated blocks before the deletions minus
after, read 5 s after 99 % were back, or at the bound), seconds from the guest's
``sync`` after the deletions until 99 % of the deleted bytes are back (``-`` when that
never happened within the bound), and the guest's wall time to write and to delete
(plus the ``fstrim`` run).

    sudo python3 bench/guest_bench.py                 # 4 x 16 MiB, every format and mode
    sudo python3 bench/guest_bench.py --files 8 --mib 32 --formats qcow2 --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from guest_scenario import MODES, ScenarioResult, run_scenario

from vmreclaim.testing.guest import build_kit, system_libvirtd

MiB = 1024 * 1024


@contextlib.contextmanager
def backend() -> Iterator[str]:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        yield "qemu"
        return
    if shutil.which("libvirtd") is None:
        yield "qemu"
        return
    with system_libvirtd():
        yield "libvirt"


def row(r: ScenarioResult) -> list[str]:
    latency = "-" if r.latency_seconds is None else f"{r.latency_seconds:.2f}"
    trim = "" if r.trim_seconds is None else f" + fstrim {r.trim_seconds:.2f}"
    return [
        r.format,
        r.mode if r.mode != "vmreclaim" else f"vmreclaim ({r.backend})",
        f"{r.deleted_bytes / MiB:.1f}",
        f"{r.freed_bytes / MiB:.1f}",
        f"{100 * r.freed_bytes / max(r.deleted_bytes, 1):.1f} %",
        latency,
        f"{r.write_seconds:.2f}",
        f"{r.delete_seconds:.2f}{trim}",
        "ok" if not r.checker.get("failures") and r.guest.returncode == 0 else "FAILED",
    ]


HEADER = [
    "format", "how", "deleted MiB", "freed MiB", "freed", "delete→99 % freed s",
    "guest write s", "guest delete s", "checker",
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mib", type=int, default=16, help="size of each file")
    parser.add_argument("--formats", default="qcow2,raw,vpc")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--bound", type=float, default=60.0, help="seconds to wait for the space")
    parser.add_argument("--settle", type=float, default=5.0, help="wait after 99 %% before reading freed")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args()

    workroot = args.keep or Path(tempfile.mkdtemp(prefix="vmreclaim-guest-bench-"))
    kit = build_kit(workroot / "kit")
    results = []
    with backend() as hv:
        for fmt in args.formats.split(","):
            for mode in args.modes.split(","):
                wd = workroot / f"{fmt}-{mode}"
                shutil.rmtree(wd, ignore_errors=True)
                r = run_scenario(
                    kit, wd, fmt=fmt, mode=mode, backend=hv, n_files=args.files, file_mib=args.mib,
                    disk_mib=max(256, 2 * args.files * args.mib + 64), bound_seconds=args.bound,
                    settle_seconds=args.settle,
                )  # fmt: skip
                results.append(r)
                print(" | ".join(row(r)), file=sys.stderr, flush=True)
    if args.keep is None:
        shutil.rmtree(workroot, ignore_errors=True)
    rows = [row(r) for r in results]
    if args.markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for cells in rows:
            print("| " + " | ".join(cells) + " |")
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"real guest: {args.files} x {args.mib} MiB written and deleted (TCG)")
        for h in HEADER:
            table.add_column(h, justify="left" if h in ("format", "how", "checker") else "right")
        for cells in rows:
            table.add_row(*cells)
        Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
