"""Helpers for the host daemon's tests (imported as ``hosttest``): an in-process daemon
over real sockets, files and SQLite, and scripted agents (``AgentPeer``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from vmreclaim.core.config import HostConfig, load_config
from vmreclaim.core.punch import allocated_bytes, allocated_ranges
from vmreclaim.core.ranges import RangeSet
from vmreclaim.host.daemon import HostDaemon
from vmreclaim.testing.helpers import make_raw_image
from vmreclaim.testing.host import host_config, static_vm

MiB = 1024 * 1024


#: Bytes the host filesystem has allocated to an image (the core's own measure).
allocated = allocated_bytes


class Site:
    """A tmp_path laid out for one host daemon: images, channels, database, config."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vms: list[dict[str, Any]] = []

    def raw_disk(self, name: str, size: int = 8 * MiB, data: list[tuple[int, int]] | None = None) -> Path:
        return make_raw_image(self.root / name, size, [(0, size)] if data is None else data)

    def channel(self, vm: str) -> Path:
        return self.root / f"{vm}.sock"

    def add_vm(self, name: str, disks: list[dict[str, Any]]) -> Path:
        self.vms.append(static_vm(name, self.channel(name), disks))
        return self.channel(name)

    def config(self, **extra: Any) -> HostConfig:
        extra.setdefault("database", self.root / "host.sqlite")
        extra.setdefault("status_socket", self.root / "status.sock")
        extra.setdefault("policy", {"driver": "always"})
        extra.setdefault("reclaim", {"tick_seconds": 0.2, "retry_max_seconds": 1})
        path = host_config(self.root / "host.yaml", self.vms, **extra)
        return load_config(path, HostConfig)


@asynccontextmanager
async def running(config: HostConfig, **kwargs: Any) -> AsyncIterator[HostDaemon]:
    daemon = HostDaemon(config, **kwargs)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.shutdown()


async def eventually(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` on the event loop until it is truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


# -- end to end: the real agent, a writer, extents -------------------------------------------


class AgentProcess:
    """``vmreclaim agent --config`` as a real process (it runs as root on the host against a
    loop-mounted image, DESIGN.md section 6), logs in ``log``."""

    def __init__(self, root: Path, channel: Path, mount: Path, disk: str = "disk0", **extra: Any) -> None:
        import yaml

        self.config = root / "agent.yaml"
        doc = {
            "transport": {"driver": "unix", "path": str(channel)},
            "filesystems": [{"mount": str(mount), "disk": disk}],
            "spool": str(root / "agent-spool"),
            "log_level": "debug",
            **extra,
        }
        self.config.write_text(yaml.safe_dump(doc))
        self.log = root / "agent.log"
        self.proc: Any = None

    def start(self) -> AgentProcess:
        import subprocess
        import sys

        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmreclaim", "--debug", "agent", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        return self

    def stop(self) -> int:
        import subprocess

        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Writer:
    """Writes, checks and deletes its own files in ``top`` until stopped: a guest that goes
    on working while its deleted space is reclaimed under it."""

    def __init__(self, top: Path, seed: int = 1) -> None:
        import random
        import threading

        self.top = top
        top.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.files: dict[Path, str] = {}
        self.written = 0
        self.deleted = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        import hashlib

        n = 0
        try:
            while not self.stop_event.is_set():
                n += 1
                data = self.rng.randbytes(self.rng.randint(1, 64) * 4096 - self.rng.randint(0, 4095))
                path = self.top / f"w{n:06d}"
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self.files[path] = hashlib.sha256(data).hexdigest()
                self.written += 1
                if len(self.files) > 40:
                    victim = self.rng.choice(sorted(self.files))
                    victim.unlink()
                    del self.files[victim]
                    self.deleted += 1
                self.stop_event.wait(0.01)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> Writer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "writer stuck (a filesystem left frozen?)"
        if self.error is not None:
            raise AssertionError(f"writer failed: {self.error!r}") from self.error

    def verify(self) -> int:
        import hashlib

        for path, digest in self.files.items():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} changed"
        return len(self.files)


def extents(*paths: Path) -> RangeSet:
    """FIEMAP (flushed) of files: byte ranges of the device under their filesystem."""
    from vmreclaim.agent import linux

    out = RangeSet()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a writer deleted it meanwhile
            continue
        try:
            out = out.union(linux.fiemap(fd).ranges)
        finally:
            os.close(fd)
    return out


def tree_extents(top: Path) -> RangeSet:
    return extents(*[Path(r) / f for r, _, fs in os.walk(top) for f in fs])


def data_ranges(path: Path) -> RangeSet:
    """Allocated byte ranges of a file (SEEK_DATA / SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return allocated_ranges(fd)
    finally:
        os.close(fd)
