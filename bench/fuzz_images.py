#!/usr/bin/env python3
"""Fuzz the qcow2 and VHD drivers with mutated real images; report every crash.

Seed images are made with qemu-img/qemu-io (qcow2 v2 and v3, extended L2, compressed
and zero clusters, snapshots, persistent bitmaps, a backing chain, an external data
file; VHD fixed and dynamic) and with the specification's layout (a differencing VHD
with partial bitmaps). Each case mutates one seed — bytes flipped in its metadata,
64-bit fields set to edge values, table pointers aimed at other tables, the file
truncated — and then does everything an offline command does short of punching: open
(probed and by name), ``info``, ``map`` of the whole disk and of random windows,
``metadata_ranges``, ``check_punchable``, a reclaim plan, and reads.

A case passes when it succeeds or fails with a :class:`VMReclaimError` (a clean refusal
with a message). Anything else — another exception, or a case running longer than the
time limit — is a crash: it is counted, its traceback printed, and the mutated image
kept under ``--keep``. The exit status is 1 if any case crashed.

    python bench/fuzz_images.py                 # 10,000 cases
    python bench/fuzz_images.py --cases 50000 --seed 7 --keep /tmp/crashes
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

MiB = 1 << 20


class CaseTimeout(Exception):
    """A case ran past its time limit (a hang is a crash)."""


@dataclass
class Seed:
    name: str
    path: Path
    fmt: str
    #: Host ranges worth mutating: the format's structures (headers, tables, bitmaps).
    hot: list[tuple[int, int]]
    #: For VHD: where checksummed structures are, so a mutation can be re-sealed and
    #: reach the tables behind the checksum.
    sealed: list[tuple[int, int, int]] = field(default_factory=list)  # (start, length, checksum at)


@dataclass
class Result:
    cases: int = 0
    passed: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    crashes: list[tuple[str, str, Path | None]] = field(default_factory=list)
    seconds: float = 0.0


def _run(*args: str | os.PathLike[str]) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=120)


def make_seeds(work: Path) -> list[Seed]:
    """Build the seed images in ``work`` (QEMU's tools plus the VHD specification)."""
    from vmreclaim.core.opening import open_image

    seeds: list[tuple[str, Path, str]] = []

    def qcow2(name: str, opts: str, *cmds: str, size: str = "4M") -> Path:
        path = work / f"{name}.qcow2"
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, size)
        if cmds:
            _run("qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], path)
        seeds.append((name, path, "qcow2"))
        return path

    qcow2("v3", "cluster_size=4096", "write -P 1 0 256k", "write -c -P 2 1M 4k", "write -c -P 3 1052672 4k",
          "write -z 2M 64k", "write -P 4 3M 4k", "discard 3M 4k")  # fmt: skip
    snap = qcow2("snap", "cluster_size=65536", "write -P 1 0 1M")
    _run("qemu-img", "snapshot", "-c", "s1", snap)
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 2 0 64k", snap)
    _run("qemu-img", "bitmap", "--add", snap, "b0")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 3 2M 128k", snap)
    qcow2("v2", "compat=0.10,cluster_size=512", "write -P 1 0 64k", "write -P 2 1M 3k")
    qcow2(
        "extl2",
        "extended_l2=on,cluster_size=32768",
        "write -P 1 4k 2k",
        "write -z 64k 16k",
        "write -P 2 1M 100k",
    )
    qcow2("refbits1", "refcount_bits=1,cluster_size=65536", "write -P 1 0 300k")
    base = qcow2("base", "cluster_size=65536", "write -P 1 0 2M")
    top = work / "top.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "4M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 1M", "-c", "write -z 0 64k", top)
    seeds.append(("overlay", top, "qcow2"))
    df = work / "df.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={work / 'df.raw'}", df, "4M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 1 512k 512k", df)
    seeds.append(("datafile", df, "qcow2"))
    for sub in ("dynamic", "fixed"):
        vhd = work / f"{sub}.vhd"
        _run("qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={sub}", vhd, "8M")
        _run("qemu-io", "-f", "vpc", "-c", "write -P 1 0 1M", "-c", "write -P 2 5M 4k", vhd)
        seeds.append((sub, vhd, "vhd"))
    seeds.append(("differencing", _differencing(work, work / "dynamic.vhd"), "vhd"))

    out = []
    for name, path, fmt in seeds:
        with open_image(path, fmt) as image:
            meta = image.metadata_ranges() if image.data_file is image.file else _qcow2_meta(image)
            hot = [(r.start, r.length) for r in meta]
            sealed = []
            if fmt == "vhd":
                size = path.stat().st_size
                sealed.append((size - 512, 512, 64))
                if getattr(image, "header", None) is not None:
                    sealed += [(0, 512, 64), (image.header.offset, 1024, 36)]  # type: ignore[attr-defined]
        out.append(Seed(name, path, fmt, hot or [(0, 512)], sealed))
    return out


def _qcow2_meta(image: object) -> object:
    """Structures of a qcow2 with an external data file live in the .qcow2 itself."""
    return image._metadata()  # type: ignore[attr-defined]


def _differencing(work: Path, parent: Path) -> Path:
    """A differencing VHD laid out by hand (QEMU cannot make one): one block, half its
    sectors present, a relative parent locator."""
    from vmreclaim.core.opening import open_image

    with open_image(parent, "vhd") as p:
        size, uid = p.virtual_size, p.footer.unique_id  # type: ignore[attr-defined]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from formats.imagetools import VhdSpec, bitmap_of, write_vhd

    spec = VhdSpec(size=size, parent=parent, parent_uid=uid, creator=b"qemu",
                   locators=[(0x57327275, parent.name.encode("utf-16-le"))],
                   blocks={1: (bitmap_of(range(0, 4096, 2)), bytes(range(256)) * 8192)})  # fmt: skip
    return write_vhd(work / "diff.vhd", spec)


# -- mutations ------------------------------------------------------------------------------------

EDGE64 = [
    0,
    1,
    0x1FF,
    0x200,
    0xFFFF,
    2**31,
    2**32 - 1,
    2**32,
    2**56 - 512,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
]


def _edge(rng: random.Random, size: int) -> int:
    pick = rng.random()
    if pick < 0.4:
        return rng.choice(EDGE64)
    if pick < 0.8:  # near the end of the file, aligned or not
        return max(0, size + rng.randint(-4096, 4096)) & rng.choice([~0, ~511, ~4095, ~65535])
    return rng.getrandbits(64)


def mutate(data: bytearray, seed: Seed, rng: random.Random) -> str:
    """Apply 1-4 mutations; return what was done (for crash reports)."""
    notes = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        start, length = rng.choice(seed.hot)
        at = min(len(data) - 1, start + rng.randrange(max(1, length)))
        if kind < 0.35:  # flip a few bits
            for _ in range(rng.randint(1, 8)):
                pos = min(len(data) - 1, at + rng.randrange(64))
                data[pos] ^= 1 << rng.randrange(8)
            notes.append(f"flip@{at:#x}")
        elif kind < 0.65:  # a 32- or 64-bit field set to an edge value
            width = rng.choice([4, 8])
            at -= at % width
            if at + width <= len(data):
                value = _edge(rng, len(data)) & ((1 << (8 * width)) - 1)
                data[at : at + width] = value.to_bytes(width, "big")
                notes.append(f"set{width * 8}@{at:#x}={value:#x}")
        elif kind < 0.8:  # aim a pointer at another structure (overlaps, self-reference)
            other, _ = rng.choice(seed.hot)
            at -= at % 8
            if at + 8 <= len(data):
                flags = int.from_bytes(data[at : at + 8], "big") & 0xFF000000000001FF
                data[at : at + 8] = (flags | other).to_bytes(8, "big")
                notes.append(f"point@{at:#x}->{other:#x}")
        elif kind < 0.9:  # a header field (first 128 bytes) set to an edge value
            at = rng.randrange(0, 128, 4)
            data[at : at + 4] = (_edge(rng, len(data)) & 0xFFFFFFFF).to_bytes(4, "big")
            notes.append(f"header32@{at:#x}")
        else:  # truncate
            cut = rng.randrange(0, len(data))
            del data[cut:]
            notes.append(f"truncate@{cut:#x}")
            if not data:
                data.append(0)
    if seed.sealed and rng.random() < 0.7:
        _reseal(data, seed)
        notes.append("resealed")
    return " ".join(notes)


def _reseal(data: bytearray, seed: Seed) -> None:
    """Recompute VHD checksums so a mutation gets past them to the tables behind."""
    for start, length, field_at in seed.sealed:
        if start + length > len(data):
            continue
        block = data[start : start + length]
        total = sum(block) - sum(block[field_at : field_at + 4])
        data[start + field_at : start + field_at + 4] = struct.pack(">I", ~total & 0xFFFFFFFF)


# -- exercising an image ------------------------------------------------------------------------


def exercise(path: Path, fmt: str, rng: random.Random) -> None:
    """Everything an offline command does to an image, short of punching it."""
    from vmreclaim.core.opening import open_image
    from vmreclaim.core.ranges import ByteRange, RangeSet
    from vmreclaim.core.reclaim import plan_reclaim

    for name in ("auto", fmt):
        with open_image(path, name) as image:
            image.info()
            size = image.virtual_size
            if not size:
                continue
            image.map(ByteRange(0, size))
            for _ in range(3):
                lo = rng.randrange(size)
                image.map(ByteRange(lo, rng.randint(1, size - lo)))
            image.metadata_ranges()
            for _ in range(2):
                lo = rng.randrange(size)
                n = min(rng.randint(1, 1 << 20), size - lo)
                image.read(lo, n)
            image.check_punchable()
            lo = rng.randrange(size)
            plan_reclaim(image, RangeSet.from_ranges([(lo, rng.randint(1, size - lo))]), 4096)


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise CaseTimeout()


def run(cases: int, seed: int = 1, *, keep: Path | None = None, progress: Callable[[int], None] | None = None,
        time_limit: float = 10.0) -> Result:  # fmt: skip
    """Run ``cases`` fuzz cases; the images live in a private temporary directory."""
    from vmreclaim.core.errors import VMReclaimError

    rng = random.Random(seed)
    result = Result()
    tmp_root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmreclaim-fuzz-", dir=tmp_root) as tmp:
        work = Path(tmp)
        seeds = make_seeds(work)
        originals = {s.name: s.path.read_bytes() for s in seeds}
        # Someone else's alarm (pytest-timeout's, in the suite) is put back afterwards.
        outer_remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        outer_started = time.monotonic()
        old = signal.signal(signal.SIGALRM, _alarm)
        try:
            for i in range(cases):
                s = seeds[i % len(seeds)]
                data = bytearray(originals[s.name])
                what = mutate(data, s, rng)
                case = s.path.with_name(f"case-{uuid.uuid4().hex[:8]}{s.path.suffix}")
                case.write_bytes(data)
                # Backing files and parents are found by name next to the image.
                signal.setitimer(signal.ITIMER_REAL, time_limit)
                try:
                    exercise(case, s.fmt, random.Random(i))
                    result.passed += 1
                except VMReclaimError as exc:
                    result.refusals[f"{type(exc).__name__} (exit {exc.exit_code})"] += 1
                except CaseTimeout:
                    result.crashes.append(
                        (f"{s.name}: {what}", "hang: over the time limit", _keep(case, keep))
                    )
                except Exception:  # anything else is exactly what we hunt
                    result.crashes.append((f"{s.name}: {what}", traceback.format_exc(), _keep(case, keep)))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    case.unlink(missing_ok=True)
                result.cases += 1
                if progress is not None:
                    progress(i + 1)
        finally:
            signal.signal(signal.SIGALRM, old)
            if outer_remaining:
                left = outer_remaining - (time.monotonic() - outer_started)
                signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))
    result.seconds = time.monotonic() - started
    return result


def _keep(case: Path, keep: Path | None) -> Path | None:
    if keep is None:
        return None
    keep.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(case, keep / case.name))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="copy crashing images here")
    args = parser.parse_args()
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("fuzzing", total=args.cases)
        result = run(args.cases, args.seed, keep=args.keep, progress=lambda n: bar.update(task, completed=n))
    table = Table(title=f"fuzz_images: {result.cases} cases, seed {args.seed}, {result.seconds:.1f} s")
    table.add_column("outcome")
    table.add_column("cases", justify="right")
    table.add_row("accepted (mapped, planned)", str(result.passed))
    for name, count in sorted(result.refusals.items()):
        table.add_row(f"refused: {name}", str(count))
    table.add_row("crashes (not a VMReclaimError, or a hang)", str(len(result.crashes)))
    console.print(table)
    for what, tb, kept in result.crashes[:20]:
        console.print(f"[red]crash[/red] {what}" + (f" (kept as {kept})" if kept else ""))
        console.print(tb)
    return 1 if result.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
