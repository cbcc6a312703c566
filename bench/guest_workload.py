"""The guest side of the end-to-end test and the guest benchmark (runs *inside* the VM).

Run as ``python workload.py MOUNT XFER N_FILES FILE_MIB [--fstrim] [--churn ROUNDS]`` by the guest's
script. It talks to the host test through files in the ``xfer`` share:

1. starts a *checker* process that writes ``K`` files of its own, then keeps rewriting
   them in place (same blocks) and verifying every one of them until ``XFER/stop``
   exists — so it is writing while the host reclaims around it;
2. waits for ``XFER/go``, writes ``N_FILES`` victim files of ``FILE_MIB`` MiB of random
   data, fsyncs them and ``sync``s, and writes ``XFER/written`` (JSON: the bytes the
   files hold on disk, the seconds it took);
3. waits for ``XFER/delete``; with ``--churn ROUNDS``, first writes, ``sync``s and at
   once deletes one 32 MiB file, ROUNDS times (short-lived files whose blocks were
   allocated and freed between two of the agent's looks: only reconciliation finds
   them); then removes the victims, ``sync``s, and writes
   ``XFER/deleted`` (JSON: bytes deleted, the guest's wall time of the deletion and,
   with ``--fstrim``, of one ``fstrim`` run right after it);
4. waits for ``XFER/stop``, stops the checker, and writes ``XFER/checker`` (JSON).

Exit status 0 only if every checker verification passed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 1024 * 1024


def wait_for(path: Path, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"workload: {path.name} did not come within {timeout}s")
        time.sleep(0.05)
    return path.read_text()


def publish(xfer: Path, name: str, doc: dict[str, object]) -> None:
    tmp = xfer / f".{name}.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.rename(xfer / name)


def read_direct(path: Path, size: int) -> bytes:
    """The file's bytes from the disk itself (O_DIRECT), not from the page cache: a
    block punched under a live file must show here."""
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.readv(fd, [buf])
    finally:
        os.close(fd)
    return bytes(buf[:got])


def checker(mount: Path, xfer: Path, count: int, interval: float) -> int:
    """Write ``count`` files, then rewrite and verify them until told to stop."""
    root = mount / "keep"
    root.mkdir(exist_ok=True)
    digests: dict[Path, str] = {}
    size = 256 * 1024
    for i in range(count):
        data = os.urandom(size)
        path = root / f"keep{i}"
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digests[path] = hashlib.sha256(data).hexdigest()
    publish(xfer, "checker-ready", {"files": count})
    rounds = failures = 0
    first_failure = ""
    while True:
        stop = (xfer / "stop").exists()
        path = list(digests)[rounds % count]
        data = os.urandom(size)
        # In place, same blocks: the file never moves, so it must survive every punch.
        with open(path, "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digests[path] = hashlib.sha256(data).hexdigest()
        for p, digest in digests.items():
            got = hashlib.sha256(read_direct(p, size)).hexdigest()
            if got != digest:
                failures += 1
                first_failure = first_failure or f"{p}: sha256 {got} != {digest} after round {rounds}"
        rounds += 1
        if stop:
            break
        time.sleep(interval)
    publish(xfer, "checker", {"rounds": rounds, "failures": failures, "first_failure": first_failure})
    return 1 if failures else 0


def main() -> int:
    mount, xfer = Path(sys.argv[1]), Path(sys.argv[2])
    n_files, file_mib = int(sys.argv[3]), int(sys.argv[4])
    fstrim = "--fstrim" in sys.argv[5:]
    churn = int(sys.argv[sys.argv.index("--churn") + 1]) if "--churn" in sys.argv else 0
    interval = float(os.environ.get("CHECKER_INTERVAL", "0.05"))
    keep = 8
    pid = os.fork()
    if pid == 0:
        os._exit(checker(mount, xfer, keep, interval))
    wait_for(xfer / "checker-ready")
    wait_for(xfer / "go")
    victims = mount / "victims"
    victims.mkdir(exist_ok=True)
    started = time.monotonic()
    written = 0
    for i in range(n_files):
        with open(victims / f"v{i}", "wb") as f:
            for _ in range(file_mib):
                f.write(os.urandom(CHUNK))
            f.flush()
            os.fsync(f.fileno())
        written += os.stat(victims / f"v{i}").st_blocks * 512
    os.sync()
    write_seconds = time.monotonic() - started
    publish(xfer, "written", {"bytes": written, "seconds": write_seconds})
    wait_for(xfer / "delete")
    for r in range(churn):
        short = victims / f"churn{r}"
        with open(short, "wb") as f:
            for _ in range(32):
                f.write(os.urandom(CHUNK))
        os.sync()
        os.unlink(short)
    started = time.monotonic()
    for i in range(n_files):
        os.unlink(victims / f"v{i}")
    os.sync()
    delete_seconds = time.monotonic() - started
    trim_seconds = None
    if fstrim:
        started = time.monotonic()
        subprocess.run(["fstrim", str(mount)], check=True)
        trim_seconds = time.monotonic() - started
    publish(xfer, "deleted", {"bytes": written, "seconds": delete_seconds, "trim_seconds": trim_seconds})
    wait_for(xfer / "stop")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
