#!/usr/bin/env python3
"""``vmreclaim image map --json`` vs ``qemu-img map --output=json``, same images, same run.

Two 64 GiB images are built with QEMU's own tools:

* a qcow2 (64 KiB clusters) with 200,000 allocated clusters scattered at random over
  the whole disk (``qemu-io`` writes 512 bytes into each);
* a dynamic VHD (2 MiB blocks) with half of its 32,768 blocks allocated at random.

Each command runs ``--runs`` times with its output sent to ``/dev/null``; the table shows
the median wall time of each, the ratio (vmreclaim / qemu-img: ≤ 1.0 means we are no
slower), the number of extents each printed, and how much of vmreclaim's time is the
map and its JSON: its time minus that of ``vmreclaim image info`` on the same image
(interpreter start-up, imports, finding the driver, parsing the header). Both maps are
checked to agree on the bytes stored (data) before timing.

    python bench/map_bench.py                    # build, time, print the table
    python bench/map_bench.py --clusters 400000 --runs 9 --dir /var/tmp
    python bench/map_bench.py --dir /var/tmp/mapbench --keep   # build once, time again later
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

GiB = 1 << 30
MiB = 1 << 20


def vmreclaim_command() -> list[str]:
    """The installed console script next to this interpreter (not a shell shim)."""
    script = Path(sys.executable).parent / "vmreclaim"
    if script.exists():
        return [str(script)]
    found = shutil.which("vmreclaim")
    return [found] if found else [sys.executable, "-m", "vmreclaim"]


def qemu_io_script(path: Path, fmt: str, commands: list[str]) -> None:
    # cache=unsafe: no flush per write; building the image is not what we measure.
    subprocess.run(["qemu-io", "-t", "unsafe", "-f", fmt, str(path)], input="\n".join(commands) + "\n",
                   text=True, check=True, capture_output=True)  # fmt: skip


def build_qcow2(path: Path, clusters: int, seed: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64G"], check=True)
    rng = np.random.default_rng(seed)
    picks = rng.choice(64 * GiB // 65536, size=clusters, replace=False)
    for i in range(0, clusters, 50_000):
        qemu_io_script(path, "qcow2", [f"write -P 1 {c * 65536} 512" for c in picks[i : i + 50_000].tolist()])


def build_vhd(path: Path, seed: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", str(path), "64G"], check=True)
    rng = np.random.default_rng(seed)
    blocks = rng.choice(32768, size=16384, replace=False)
    qemu_io_script(path, "vpc", [f"write -P 1 {b * 2 * MiB + 4096} 4096" for b in blocks.tolist()])


#: As an installed package runs: with its bytecode cached (a development shell may set
#: PYTHONDONTWRITEBYTECODE, which would make every run compile vmreclaim again).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str], runs: int) -> float:
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True, env=ENV)  # warm: caches, bytecode
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True, env=ENV)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def data_bytes_agree(ours: list[dict[str, object]], theirs: list[dict[str, object]]) -> bool:
    """Both maps store the same number of bytes in the file, at the same offsets."""
    ours_data = {(e["start"], e["offset"]) for e in ours if e["kind"] in ("data", "shared")}
    their_data = {(e["start"], e["offset"]) for e in theirs if e.get("data") and e["depth"] == 0}
    ours_total = sum(int(e["length"]) for e in ours if e["kind"] in ("data", "shared"))  # type: ignore[call-overload]
    their_total = sum(int(e["length"]) for e in theirs if e.get("data") and e["depth"] == 0)  # type: ignore[call-overload]
    return ours_total == their_total and len(ours_data) == len(their_data)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clusters", type=int, default=200_000, help="allocated qcow2 clusters")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="where to build (needs ~13 GiB free)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the images in --dir and reuse them next time"
    )
    args = parser.parse_args()
    if args.keep and args.dir is None:
        parser.error("--keep needs --dir")
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ours_cmd = vmreclaim_command()
    rows = []
    holder = (
        nullcontext(str(args.dir))
        if args.keep
        else tempfile.TemporaryDirectory(prefix="vmreclaim-map-bench-", dir=args.dir)
    )
    with holder as tmp:
        work = Path(tmp)
        qcow2 = work / f"scattered-{args.clusters}-{args.seed}.qcow2"
        vhd = work / f"dynamic-{args.seed}.vhd"
        images = [("qcow2", qcow2, "qcow2"), ("vhd", vhd, "vpc")]
        with console.status("building a 64 GiB qcow2 and a 64 GiB VHD with qemu-io ..."):
            if not qcow2.exists():
                build_qcow2(qcow2, args.clusters, args.seed)
            if not vhd.exists():
                build_vhd(vhd, args.seed)
        for name, path, qemu_fmt in images:
            ours = [*ours_cmd, "image", "map", "--json", "--format", name, str(path)]
            theirs = ["qemu-img", "map", "-f", qemu_fmt, "--output=json", str(path)]
            info = [*ours_cmd, "image", "info", "--json", "--format", name, str(path)]
            ours_doc = json.loads(subprocess.run(ours, capture_output=True, check=True).stdout)
            their_doc = json.loads(subprocess.run(theirs, capture_output=True, check=True).stdout)
            if not data_bytes_agree(ours_doc, their_doc):
                console.print(f"[red]{name}: vmreclaim and qemu-img disagree on the stored data[/red]")
                return 1
            t_ours, t_theirs, t_info = (
                timed(ours, args.runs),
                timed(theirs, args.runs),
                timed(info, args.runs),
            )
            rows.append((name, len(ours_doc), len(their_doc), t_ours, t_theirs, t_info))
    table = Table(title=f"image map, 64 GiB virtual, median of {args.runs} runs")
    columns = ("image", "extents (ours)", "extents (qemu-img)", "vmreclaim s", "qemu-img s", "ratio",
               "image info s", "map + JSON s")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "image" else "right")
    for name, n_ours, n_theirs, t_ours, t_theirs, t_info in rows:
        table.add_row(name, f"{n_ours:,}", f"{n_theirs:,}", f"{t_ours:.3f}", f"{t_theirs:.3f}",
                      f"{t_ours / t_theirs:.2f}", f"{t_info:.3f}", f"{t_ours - t_info:.3f}")  # fmt: skip
    console.print(table)
    console.print(f"vmreclaim: {' '.join(ours_cmd)}; qemu-img: {shutil.which('qemu-img')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
