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
from vmreclaim.host.daemon import HostDaemon
from vmreclaim.testing.helpers import make_raw_image
from vmreclaim.testing.host import host_config, static_vm

MiB = 1024 * 1024


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


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
