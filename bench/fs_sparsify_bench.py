#!/usr/bin/env python3
"""Offline sparsify of XFS and NTFS: ``vmreclaim image sparsify`` vs ``virt-sparsify --in-place``.

Each filesystem is built as a guest would leave it: XFS through the host kernel on a
loop device, NTFS through an ntfs-3g FUSE mount; files are written, every other one is
deleted (its blocks keep their data), the disk is converted to qcow2 and each tool gets
its own identical copy. The table shows wall time and host bytes freed per tool and
their ratios; afterwards the checker of each filesystem (``xfs_repair -n``,
``ntfsfix -n``) runs on vmreclaim's result. virt-sparsify runs as in
``sparsify_bench.py`` (``LIBGUESTFS_BACKEND=direct``, ``force_tcg``). Needs root.

    python bench/fs_sparsify_bench.py                    # xfs and ntfs, 1 GiB, 1,000 files
    python bench/fs_sparsify_bench.py --fs xfs --tools vmreclaim
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparsify_bench import (  # a sibling script (bench/ is no package)
    GIB,
    MIB,
    Result,
    allocated,
    copy,
    run_virt_sparsify,
    run_vmreclaim,
    sh,
)


def populate(mnt: Path, files: int, mean: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.integers(1, 256, size=8 * MIB, dtype=np.uint8).tobytes()
    sizes = np.minimum(np.maximum(1, rng.exponential(mean, size=files).astype(np.int64)), len(pool) - 1)
    for i, size in enumerate(sizes.tolist()):
        off = int(rng.integers(0, len(pool) - size))
        (mnt / f"f{i:06d}").write_bytes(pool[off : off + size])
    subprocess.run(["sync"], check=True)
    for i in range(0, files, 2):
        (mnt / f"f{i:06d}").unlink()


def build(fs: str, work: Path, size: int, files: int, mean: int, console: Console) -> Path:
    raw = work / f"{fs}.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    t = time.monotonic()
    if fs == "xfs":
        sh(["mkfs.xfs", "-q", "-f", str(raw)])
        sh(["mount", "-o", "loop", str(raw), str(mnt)])
    else:
        sh(["mkntfs", "-q", "-F", "-Q", str(raw)])
        sh(["ntfs-3g", str(raw), str(mnt)])
    try:
        populate(mnt, files, mean)
    finally:
        sh(["umount", str(mnt)])
    base = work / f"{fs}.qcow2"
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)])
    raw.unlink()
    console.print(
        f"({fs}) built {size // GIB} GiB, {files} files, half deleted; qcow2 holds "
        f"{allocated(base) / MIB:.0f} MiB ({time.monotonic() - t:.0f} s)"
    )
    return base


def verify(fs: str, image: Path) -> None:
    raw = image.with_suffix(".check.raw")
    sh(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)])
    try:
        sh(["xfs_repair", "-n", "-f", str(raw)] if fs == "xfs" else ["ntfsfix", "-n", str(raw)])
    finally:
        raw.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fs", default="xfs,ntfs")
    parser.add_argument("--tools", default="vmreclaim,virt-sparsify")
    parser.add_argument("--size-gib", type=int, default=1)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--mean-kib", type=int, default=256)
    args = parser.parse_args()
    console = Console()
    runners = {"vmreclaim": run_vmreclaim, "virt-sparsify": run_virt_sparsify}
    for fs in args.fs.split(","):
        with tempfile.TemporaryDirectory(prefix=f"fsbench-{fs}-", dir="/var/tmp") as tmp:
            work = Path(tmp)
            base = build(fs, work, args.size_gib * GIB, args.files, args.mean_kib * 1024, console)
            results: list[Result] = []
            for tool in args.tools.split(","):
                image = copy(base, work / f"{tool}.qcow2")
                results.append(runners[tool](image))
                if tool == "vmreclaim":
                    verify(fs, image)
                image.unlink()
            table = Table(title=f"{fs}: {args.size_gib} GiB, {args.files} files, half deleted (qcow2)")
            for col in ("tool", "seconds", "freed MiB", "freed vs vmreclaim", "time vs vmreclaim", "note"):
                table.add_column(col)
            ref = results[0]
            for r in results:
                table.add_row(
                    r.tool,
                    f"{r.seconds:.2f}",
                    f"{r.freed / MIB:.1f}",
                    f"{r.freed / ref.freed:.3f}" if ref.freed else "-",
                    f"{r.seconds / ref.seconds:.1f}x",
                    r.note,
                )
            console.print(table)
            shutil.rmtree(work / "mnt", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
