#!/usr/bin/env python3
"""Reconciliation of a fragmented 1 TiB filesystem, side by side with ``fstrim``.

For each filesystem (ext4, XFS) this builds a 1 TiB sparse image, loop-mounts it and
fragments its free space: one file is fallocated (unwritten extents, no data written)
and every other 4 KiB block of it is punched out, leaving ``--extents`` free extents of
one block between allocated ones. Then it measures, on the real kernel:

* **agent**: the agent's whole free space of the disk (``vmreclaim.agent.reconcile``:
  statfs, syncfs, GETFSMAP over the whole device, syncfs, translation to disk bytes) and
  its wire encoding, in a fresh process: wall time and peak RSS (with the RSS after the
  imports, so the difference is what the work costs);
* **wire**: bytes of ``free_space`` lines sent, their number, and the same ranges as the
  JSON pairs of a record for comparison;
* **host**: decoding and validating those lines (``FreeSpaceDecoder``) and intersecting
  the result with the data map of a 64 GiB qcow2 with 200,000 allocated clusters built
  with qemu-io (``vmreclaim.host.reconcile.intersect``);
* **fstrim**: ``fstrim -v`` of the same mounted filesystem (which discards every free
  extent through the loop device into the sparse image file).

    python bench/reconcile_bench.py                       # ext4 and XFS, 1,100,000 extents
    python bench/reconcile_bench.py --fs ext4 --extents 2000000 --dir /var/tmp/rcbench

Needs root (loop devices, mount), mkfs.ext4, mkfs.xfs, fstrim, qemu-img, qemu-io.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from map_bench import build_qcow2

from vmreclaim.testing.linux import loop_device, make_filesystem, mounted

TiB = 1 << 40
GiB = 1 << 30
BLOCK = 4096

#: Run in a fresh interpreter: the agent's time and memory without this script's.
AGENT = r"""
import json, os, resource, sys, time
from vmreclaim.agent.watched import WatchedFs
from vmreclaim.agent.reconcile import reconcile_disk
from vmreclaim.core import protocol as p
from vmreclaim.core.config import FilesystemEntry
from vmreclaim.core.freespace import Reconcile, messages
from vmreclaim.core.pipeline import Pipeline
mount, out = sys.argv[1], sys.argv[2]
pipeline = Pipeline()
fs = WatchedFs(FilesystemEntry(mount=mount, disk="disk0"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.monotonic()
report = reconcile_disk("disk0", [fs], pipeline)
lines = [p.encode(m) for m in messages(Reconcile(id=1, disk="disk0"), report.encoded)]
seconds = time.monotonic() - started
with open(out, "wb") as f:
    f.writelines(lines)
print(json.dumps({"seconds": seconds, "base_rss_kib": base,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "ranges": report.encoded.total_ranges, "free_bytes": report.encoded.total_bytes,
                  "lines": len(lines), "bytes": sum(map(len, lines)),
                  "disk_size": fs.disk_size, "partial": report.encoded.partial}))
"""


def fragment(mnt: Path, extents: int, seed: int = 7) -> None:
    """One fallocated file with ``extents`` holes punched out of it: runs of 1-3 blocks
    kept and 1-4 blocks punched, at random (a regular pattern would flatter zlib)."""
    import ctypes

    import numpy as np

    rng = np.random.default_rng(seed)
    kept = rng.integers(1, 4, extents)
    holes = rng.integers(1, 5, extents)
    ends = np.cumsum(kept + holes)
    starts = ends - holes
    path = mnt / "fragmented"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, int(ends[-1]) * BLOCK)
        libc = ctypes.CDLL(None, use_errno=True)
        punch = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        for start, length in zip(starts.tolist(), holes.tolist(), strict=True):
            if libc.fallocate(fd, punch, ctypes.c_long(start * BLOCK), ctypes.c_long(length * BLOCK)) != 0:
                raise OSError(ctypes.get_errno(), f"punch at block {start}")
        os.fsync(fd)
    finally:
        os.close(fd)


def host_side(lines_path: Path, qcow2: Path, disk_size: int) -> dict[str, float]:
    import asyncio

    from vmreclaim.core import protocol as p
    from vmreclaim.core.opening import open_image
    from vmreclaim.host.reconcile import FreeSpaceCollector, intersect

    async def decode() -> tuple[float, object]:
        collector = FreeSpaceCollector()
        _request, future = collector.ask("disk0", disk_size)
        started = time.monotonic()
        with open(lines_path, "rb") as f:
            for line in f:
                msg = p.decode_from_agent(line)
                msg = msg.model_copy(update={"id": _request.id})  # type: ignore[union-attr]
                refusal = collector.received(msg)
                assert refusal is None, refusal
        answer = await future
        return time.monotonic() - started, answer

    decode_seconds, answer = asyncio.run(decode())
    started = time.monotonic()
    with open_image(qcow2, "qcow2") as image:
        result = intersect(image, answer.free)  # type: ignore[attr-defined]
    return {
        "decode_seconds": decode_seconds,
        "intersect_seconds": time.monotonic() - started,
        "reclaimable_bytes": result.reclaimable.total,
        "data_bytes_intersected": result.allocated_bytes,
    }


def bench_fs(fstype: str, extents: int, workdir: Path, qcow2: Path) -> dict[str, object]:
    image = workdir / f"{fstype}.img"
    with open(image, "wb") as f:
        f.truncate(TiB)
    make_filesystem(image, fstype, *(["-E", "nodiscard"] if fstype == "ext4" else ["-K"]))
    row: dict[str, object] = {"fs": fstype}
    with loop_device(image) as dev, mounted(dev, workdir / f"{fstype}-mnt") as mnt:
        started = time.monotonic()
        fragment(mnt, extents)
        row["build_seconds"] = round(time.monotonic() - started, 1)
        lines = workdir / f"{fstype}.lines"
        out = subprocess.run(
            [sys.executable, "-c", AGENT, str(mnt), str(lines)], capture_output=True, text=True, check=True
        )
        agent = json.loads(out.stdout)
        row.update(agent)
        row.update(host_side(lines, qcow2, int(agent["disk_size"])))
        started = time.monotonic()
        trim = subprocess.run(["fstrim", "-v", str(mnt)], capture_output=True, text=True, check=True)
        row["fstrim_seconds"] = time.monotonic() - started
        row["fstrim"] = trim.stdout.strip()
    image.unlink()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fs", nargs="+", default=["ext4", "xfs"])
    ap.add_argument("--extents", type=int, default=1_100_000)
    ap.add_argument("--clusters", type=int, default=200_000)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="reconcile-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    qcow2 = workdir / "host.qcow2"
    if not qcow2.exists():
        started = time.monotonic()
        build_qcow2(qcow2, args.clusters, seed=7)
        print(
            f"qcow2 64 GiB, {args.clusters} clusters built in {time.monotonic() - started:.0f}s",
            file=sys.stderr,
        )
    rows = [bench_fs(fs, args.extents, workdir, qcow2) for fs in args.fs]
    print(json.dumps(rows, indent=1))
    print()
    print("| fs | free extents | agent s | agent peak RSS (after imports) | lines | bytes sent | "
          "bytes/extent | host decode s | host intersect s (64 GiB qcow2) | fstrim s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['fs']} | {r['ranges']:,} | {r['seconds']:.2f} | {r['peak_rss_kib'] / 1024:.0f} MiB "
            f"({r['base_rss_kib'] / 1024:.0f} MiB) | {r['lines']} | {r['bytes']:,} | "
            f"{r['bytes'] / max(1, r['ranges']):.2f} | {r['decode_seconds']:.2f} | "
            f"{r['intersect_seconds']:.2f} | {r['fstrim_seconds']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
