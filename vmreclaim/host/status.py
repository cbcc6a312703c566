"""``vmreclaim status``: the running daemon's state, its document and its socket.

:class:`StatusDocument` builds the document from the daemon's parts (the registry's
VMs, the scheduler's disks, the intake's counts, the committer's). The daemon listens
on ``status_socket`` (a Unix socket, mode 0600); a client connects,
writes one line (``status``), and reads one JSON document (DESIGN.md section 8)::

    {"vms": [{"name", "running", "disks": [{"id", "path", "format", "pending_bytes",
              "punched_bytes", "freed_bytes", "last_reclaim", ...}], ...}],
     "policy": {"driver", ...its state}, "rejected_records", ...}

``last_reclaim`` is Unix time in seconds (``null`` if never). Fields beyond the
contract (requested and verified bytes, the last decision and outcome, the agent) are
there for people and may grow; none is ever removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmreclaim import __version__
from vmreclaim.core.errors import ChannelError, DaemonUnavailableError
from vmreclaim.host.unixserver import UnixSocketServer, exchange

if TYPE_CHECKING:
    # Types only: ``vmreclaim status`` (the client below) need not load the daemon's
    # parts, and none of these modules imports this one.
    from vmreclaim.core.config import HostConfig
    from vmreclaim.core.hypervisors import Hypervisor
    from vmreclaim.core.policies import Policy
    from vmreclaim.host.disks import DiskRuntime
    from vmreclaim.host.images import ImageOpener
    from vmreclaim.host.ingest import Committer
    from vmreclaim.host.intake import Intake
    from vmreclaim.host.metrics import HostMetrics
    from vmreclaim.host.registry import VMRegistry
    from vmreclaim.host.scheduler import Scheduler

#: Where ``vmreclaim status`` looks without ``--config`` (the example configuration's
#: path); ``VMRECLAIM_STATUS_SOCKET`` overrides it.
DEFAULT_STATUS_SOCKET = Path("/run/vmreclaim/status.sock")
#: A status document larger than this is refused by the client (a broken daemon).
MAX_STATUS_BYTES = 64 * 1024 * 1024


def status_socket_path(config: str | os.PathLike[str] | None) -> Path:
    """The status socket of the host configuration ``config``, or the default one."""
    if config is not None:
        from vmreclaim.core.config import HostConfig, load_config

        return load_config(Path(config), HostConfig).status_socket
    env = os.environ.get("VMRECLAIM_STATUS_SOCKET")
    return Path(env) if env else DEFAULT_STATUS_SOCKET


def query_status(path: str | os.PathLike[str], timeout: float = 10.0) -> dict[str, Any]:
    """Ask the daemon listening on ``path`` for its status document."""
    path = Path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise DaemonUnavailableError(
                f"no host daemon status socket at {path} (is `vmreclaim host` running? "
                "pass its --config to find its status_socket)"
            ) from None
        except OSError as exc:
            raise DaemonUnavailableError(
                f"cannot reach the host daemon at {path}: {exc.strerror or exc}"
            ) from exc
        try:
            doc = exchange(sock, b"status\n", MAX_STATUS_BYTES, "status", path)
        except TimeoutError:
            raise DaemonUnavailableError(
                f"host daemon at {path} did not answer within {timeout:.0f}s"
            ) from None
        except OSError as exc:
            raise ChannelError(f"reading status from {path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    if "vms" not in doc:
        raise ChannelError(f"status from {path} is not a vmreclaim status document")
    return doc


class StatusServer(UnixSocketServer):
    """Answers every connection on the status socket with ``document()``."""

    what = "status_socket"

    def __init__(self, path: Path, document: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        super().__init__(path)
        self.document = document

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(TimeoutError, ValueError, asyncio.IncompleteReadError):
            await asyncio.wait_for(reader.readline(), 2.0)
        doc = await self.document()
        writer.write(json.dumps(doc).encode() + b"\n")
        await writer.drain()



# -- the document ----------------------------------------------------------------------------


class StatusDocument:
    """Builds the ``vmreclaim status --json`` document (DESIGN.md section 8)."""

    def __init__(
        self,
        config: HostConfig,
        hypervisor: Hypervisor,
        policy: Policy,
        registry: VMRegistry,
        scheduler: Scheduler,
        intake: Intake,
        committer: Committer,
        images: ImageOpener,
        metrics: HostMetrics,
        executor: Executor,
        *,
        started: float,
    ) -> None:
        self._config = config
        self._hypervisor = hypervisor
        self._policy = policy
        self._registry = registry
        self._scheduler = scheduler
        self._intake = intake
        self._committer = committer
        self._images = images
        self._metrics = metrics
        self._executor = executor
        self._started = started

    async def build(self) -> dict[str, Any]:
        vms_by_name = self._registry.vms
        if type(self._hypervisor).capabilities.live_state and vms_by_name:
            # Running state as of now, but a slow hypervisor delays the answer by 2 s at most.
            loop = asyncio.get_running_loop()
            runtimes = list(vms_by_name.values())
            asks = [
                loop.run_in_executor(self._executor, self._hypervisor.refresh, v.info.identity)
                for v in runtimes
            ]
            await asyncio.wait(asks, timeout=2.0)
            for vmrt, ask in zip(runtimes, asks, strict=True):
                if not ask.done():
                    ask.cancel()
                elif not ask.cancelled() and ask.exception() is None:
                    fresh = ask.result()
                    if fresh is not None:
                        vmrt.info = fresh
        policy_state = self._policy.state()
        now, mono = time.time(), time.monotonic()
        vms = []
        for name in sorted(vms_by_name):
            vmrt = vms_by_name[name]
            session = vmrt.session
            disks = []
            for d in vmrt.info.disks:
                rt = self._scheduler.disks.get(d.key)
                if rt is not None:
                    mode = session.mode_of(d.id) if session is not None else None
                    disks.append(self._disk(rt, mode, policy_state, mono))
            vms.append(
                {
                    "name": name,
                    "uuid": vmrt.info.identity.uuid,
                    "running": vmrt.info.running,
                    "agent": session.describe() if session is not None else {"connected": False},
                    "rejected_records": vmrt.rejected,
                    "disks": disks,
                }
            )
        cfg = self._config
        metrics = None
        if cfg.metrics is not None:
            metrics = {"address": cfg.metrics.address, "port": self._metrics.port}
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": self._started,
            "uptime_seconds": now - self._started,
            "database": str(cfg.database),
            "hypervisor": cfg.hypervisor.driver,
            "metrics": metrics,
            "vms": vms,
            "policy": {"driver": cfg.policy.driver, **policy_state},
            "rejected_records": self._intake.rejected_total,
            "ingest": {
                "commits": self._committer.commits,
                "last_commit_seconds": self._committer.last_commit_seconds,
            },
            "orphaned": {k: p.bytes_upper for k, p in self._scheduler.orphans.items() if p},
        }

    def _disk(self, rt: DiskRuntime, mode: str | None, policy: dict[str, Any], mono: float) -> dict[str, Any]:
        d, t = rt.disk, rt.totals
        pending = rt.pending.exact()
        attempt = rt.last_attempt
        if rt.busy:
            state = "reclaiming"
        elif not pending:
            state = "idle"
        elif rt.retry_at > mono and attempt is not None:
            state = f"retry in {rt.retry_at - mono:.0f}s: {attempt.outcome}: {attempt.detail}"
        elif rt.last_decision is not None:
            state = f"waiting: {rt.last_decision.reason}"
        else:
            state = "pending"
        try:
            image_size: int | None = os.stat(d.path).st_size
        except OSError:
            image_size = None
        return {
            "id": d.id,
            "path": str(d.path),
            "format": self._images.format_of(d),
            "pending_bytes": pending.total,
            "pending_ranges": len(pending),
            "pending_records": rt.pending.records,
            "punched_bytes": t.punched_bytes,
            "freed_bytes": t.freed_bytes,
            "requested_bytes": t.requested_bytes,
            "verified_bytes": t.verified_bytes,
            "received_records": t.received_records,
            "received_bytes": t.received_bytes,
            "reclaims": t.reclaims,
            "last_reclaim": t.last_reclaim,
            "image_size": image_size,
            "threshold": policy.get("threshold"),
            "mode": mode,
            "state": state,
            "last_decision": (
                {"reclaim": rt.last_decision.reclaim, "reason": rt.last_decision.reason}
                if rt.last_decision is not None
                else None
            ),
            "last_attempt": (
                {
                    "at": rt.last_attempt_at,
                    "mode": attempt.mode,
                    "outcome": attempt.outcome,
                    "detail": attempt.detail,
                    "requested_bytes": attempt.requested_bytes,
                    "verified_bytes": attempt.verified_bytes,
                    "punched_bytes": attempt.punched_bytes,
                    "freed_bytes": attempt.freed_bytes,
                }
                if attempt is not None
                else None
            ),
        }
