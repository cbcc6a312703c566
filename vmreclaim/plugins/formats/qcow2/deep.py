"""``image reclaim --deep`` for qcow2: release whole clusters through QEMU's own tools.

QEMU marks discarded clusters zero in the L2 tables, drops their refcounts and punches
what becomes free (``-d unmap``), so it reuses those clusters instead of growing the
file. Offline only: ``qemu-io`` takes QEMU's locks and refuses an image in use.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from vmreclaim.core.errors import ImageBusyError, ImageError, VMReclaimError
from vmreclaim.core.ranges import ByteRange, RangeSet

#: ``qemu-io discard`` refuses requests above about 2 GiB; we send at most this.
_DISCARD_PIECE = 1 << 30
#: Discard commands per ``qemu-io`` run (each run re-opens the image).
_DISCARD_BATCH = 4096


def discard_clusters(path: Path, cluster_size: int, virtual_size: int, guest_ranges: RangeSet) -> None:
    """Discard every whole cluster inside ``guest_ranges``. Only whole clusters can be
    discarded (QEMU ignores partial ones); the final partial cluster of a disk whose
    size is not a multiple of the cluster size counts as whole."""
    cs, size = cluster_size, virtual_size
    ranges = guest_ranges.clip(ByteRange(0, size))
    starts = -(-ranges.starts // cs) * cs
    ends = np.where(ranges.ends >= size, size, (ranges.ends // cs) * cs)
    keep = ends > starts
    commands: list[str] = []
    for s, e in zip(starts[keep].tolist(), ends[keep].tolist(), strict=True):
        for piece in range(s, e, _DISCARD_PIECE):
            commands.append(f"discard {piece} {min(_DISCARD_PIECE, e - piece)}")
    for i in range(0, len(commands), _DISCARD_BATCH):
        _qemu_io(path, commands[i : i + _DISCARD_BATCH])


def _qemu_io(path: Path, commands: list[str]) -> None:
    import subprocess  # deep mode only: keep `image map` start-up lean

    argv = ["qemu-io", "-f", "qcow2", "-d", "unmap", str(path)]
    try:
        proc = subprocess.run(
            argv,
            input="\n".join(commands) + "\n",
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VMReclaimError(f"{path}: qemu-io failed to run: {exc}") from exc
    output = proc.stdout + proc.stderr
    if re.search(r'Failed to get "?write"? lock|Is another process using the image', output):
        raise ImageBusyError(
            f"{path}: image is busy: another process holds it (qemu-io: "
            f"{output.strip().splitlines()[0]}); the punch was done, the deep discard was not"
        )
    failed = [line for line in output.splitlines() if "failed" in line or "error" in line.lower()]
    if proc.returncode != 0 or failed:
        detail = (failed or output.strip().splitlines() or [f"exit {proc.returncode}"])[0]
        raise ImageError(f"{path}: qemu-io discard failed: {detail}")
