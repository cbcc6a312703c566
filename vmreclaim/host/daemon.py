"""``vmreclaim host``: the daemon that receives deletion records and reclaims them.

:class:`HostDaemon` is the daemon's life: it loads the hypervisor and policy drivers,
builds the parts and hands each the collaborators it needs, starts them, and stops them
in order. The parts, one job each:

* :mod:`~vmreclaim.host.registry` — the VMs, their channels' listeners and sessions;
* :mod:`~vmreclaim.host.intake` — what a session may ask of the daemon;
* :mod:`~vmreclaim.host.scheduler` — each disk's state, the policy, when to reclaim;
* :mod:`~vmreclaim.host.reclaimer` — one safe reclaim attempt (DESIGN.md section 4);
* :mod:`~vmreclaim.host.bookkeeping` — an attempt's outcome stored and accounted for;
* :mod:`~vmreclaim.host.status` — the status document and socket.

The event loop does the protocol and the bookkeeping; SQLite runs on one database
thread and image work (opening, translating, punching, filesystem reads) on a small
pool, so a slow disk never stalls the agents.

Life of a record: a session validates it → the committer stores it durably → the
session acks it → the disk's pending ranges grow → the scheduler asks the policy
(after commits, and every ``reclaim.tick_seconds``) → the reclaimer runs one safe
attempt → the bookkeeping stores the result with the records it handled removed, in one
transaction → the policy learns the host storage state and the freed bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from vmreclaim import __version__
from vmreclaim.core import loader
from vmreclaim.core.config import HostConfig
from vmreclaim.core.errors import HypervisorError, VMReclaimError
from vmreclaim.core.hypervisors import Hypervisor, VMEvent
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.plugins import Plugins
from vmreclaim.core.policies import Policy
from vmreclaim.host.bookkeeping import ReclaimBook
from vmreclaim.host.budget import raise_nofile_limit
from vmreclaim.host.control import ControlServer, control_socket_path
from vmreclaim.host.disks import DiskRuntime
from vmreclaim.host.formats import FormatLedger
from vmreclaim.host.images import ImageOpener
from vmreclaim.host.ingest import Committer
from vmreclaim.host.intake import Intake
from vmreclaim.host.logs import bug, event, setup_logging
from vmreclaim.host.metrics import HostMetrics
from vmreclaim.host.operator import DaemonSite, Operator
from vmreclaim.host.pending import PendingRanges
from vmreclaim.host.reclaimer import Reclaimer
from vmreclaim.host.reconcile import ReconcileClock
from vmreclaim.host.reconcile_jobs import Reconciliations
from vmreclaim.host.registry import VMRegistry, VMRuntime
from vmreclaim.host.scheduler import Scheduler
from vmreclaim.host.status import StatusDocument, StatusServer
from vmreclaim.host.store import DeletionStore

T = TypeVar("T")


class HostDaemon:
    """The host daemon; :func:`run_host` runs one until SIGTERM/SIGINT."""

    def __init__(
        self,
        config: HostConfig,
        *,
        hypervisor: Hypervisor | None = None,
        policy: Policy | None = None,
        plugins: Plugins | None = None,
    ) -> None:
        self.config = config
        self.hypervisor = hypervisor or loader.load_driver(
            "hypervisors", config.hypervisor.driver, Hypervisor, config.hypervisor.options
        )
        self.policy = policy or loader.load_driver(
            "policies", config.policy.driver, Policy, config.policy.options
        )
        self.pipeline = Pipeline(plugins)
        self.metrics = HostMetrics()
        self.images = ImageOpener()
        self.started = time.time()
        self._db = ThreadPoolExecutor(1, thread_name_prefix="vmreclaim-db")
        self._work = ThreadPoolExecutor(config.reclaim.parallel + 2, thread_name_prefix="vmreclaim-work")
        self.reclaimer = Reclaimer(
            self.hypervisor,
            self.pipeline,
            self._work,
            self.images,
            lease_seconds=config.fence.lease_seconds,
            margin_seconds=config.fence.margin_seconds,
            trim_timeout=config.reclaim.trim_timeout_seconds,
        )
        self.scheduler = Scheduler(
            config.reclaim, self.policy, config.policy.driver, self.pipeline, self.reclaimer, self.metrics
        )
        self.registry = VMRegistry(
            self.hypervisor,
            self.scheduler,
            self.metrics,
            self._work,
            rescan_seconds=config.reclaim.rescan_seconds,
        )
        self.store: DeletionStore | None = None
        self.committer: Committer | None = None
        self.intake: Intake | None = None
        self._document: StatusDocument | None = None
        self.status = StatusServer(config.status_socket, self.status_document)
        self.reconciliations: Reconciliations | None = None
        self.control: ControlServer | None = None
        self._critical: list[asyncio.Task[None]] = []

    # Read-only views for tests and embedders; the parts own the state.
    @property
    def vms(self) -> dict[str, VMRuntime]:
        return self.registry.vms

    @property
    def disks(self) -> dict[str, DiskRuntime]:
        return self.scheduler.disks

    @property
    def rejected_total(self) -> int:
        return self.intake.rejected_total if self.intake is not None else 0

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._work, fn, *args)

    async def _db_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, lambda: fn(*args, **kwargs))

    # -- start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, list the VMs, listen on every channel; raise if unusable."""
        cfg = self.config
        store = self.store = await self._db_call(DeletionStore, cfg.database)
        # Formats once seen are kept across restarts (vmreclaim.host.formats).
        self.images.use_ledger(await self._db_call(FormatLedger, cfg.database))
        try:
            infos = await self._thread(self.hypervisor.vms)
        except HypervisorError:
            await self._db_call(store.close)
            raise
        state = await self._db_call(store.policy_state, cfg.policy.driver)
        if state is not None:
            self.policy.restore(state)
        totals = await self._db_call(store.totals)
        rejected = await self._db_call(store.rejected)
        loads = await self._db_call(store.pending_by_disk)
        self.scheduler.load_orphans(
            {key: PendingRanges.loaded(load.ids, load.received, load.ranges) for key, load in loads.items()}
        )
        committer = Committer(
            store, self._db, self.scheduler.committed, first_id=await self._db_call(store.max_record_id) + 1
        )
        self.intake = Intake(
            self.registry,
            self.scheduler,
            committer,
            self.images,
            self.pipeline,
            self.metrics,
            self._work,
            rejected_total=sum(rejected.values()),
        )
        book = ReclaimBook(
            committer,
            self.policy,
            cfg.policy.driver,
            self.metrics,
            retry_max_seconds=cfg.reclaim.retry_max_seconds,
        )
        self._document = StatusDocument(
            cfg,
            self.hypervisor,
            self.policy,
            self.registry,
            self.scheduler,
            self.intake,
            committer,
            self.images,
            self.metrics,
            self._work,
            started=self.started,
        )
        self.committer = committer
        site = DaemonSite(self.registry, self.scheduler, committer, self.images, self._work)
        rc = cfg.reconcile
        self.reconciliations = Reconciliations(
            site,
            ReconcileClock(rc.interval_seconds, rc.growth_bytes, rc.min_gap_seconds),
            timeout=rc.timeout_seconds,
            enabled=rc.enabled,
        )
        operator = Operator(
            self.reconciliations, site, self.registry, self.images, self._work, self.metrics.registry
        )
        await self.status.start()
        self.control = ControlServer(control_socket_path(cfg.status_socket), operator.handle)
        try:
            await self.control.start()
        except VMReclaimError:
            await self.status.close()
            raise
        if cfg.metrics is not None:
            try:
                port = self.metrics.serve(cfg.metrics.port, cfg.metrics.address)
            except OSError as exc:
                await self.status.close()
                raise VMReclaimError(
                    f"metrics: cannot listen on {cfg.metrics.address}:{cfg.metrics.port}: "
                    f"{exc.strerror or exc}"
                ) from exc
            event(logging.INFO, "metrics.listening", address=cfg.metrics.address, port=port)
        self.registry.apply(infos, self.intake, totals)
        for vm, count in rejected.items():
            if vm in self.registry.vms:
                self.registry.vms[vm].rejected = count
        loop = asyncio.get_running_loop()
        if type(self.hypervisor).capabilities.events:
            # Events are hints to list the VMs again now rather than at the next rescan.
            def on_event(ev: VMEvent) -> None:
                event(logging.INFO, "vm.event", vm=ev.vm.name, kind=ev.kind, detail=ev.detail)
                loop.call_soon_threadsafe(self.request_rescan)

            self.hypervisor.watch(on_event)
        self._critical = [
            loop.create_task(committer.run(), name="committer"),
            loop.create_task(self.scheduler.run(self.registry, book), name="scheduler"),
            loop.create_task(self.registry.run_rescans(), name="rescan"),
            loop.create_task(
                self.reconciliations.run(cfg.reclaim.tick_seconds, lambda: list(self.registry.vms)),
                name="reconcile",
            ),
        ]
        disks = self.scheduler.disks
        orphaned = {k: p.bytes_upper for k, p in self.scheduler.orphans.items() if p}
        event(
            logging.INFO,
            "host.ready",
            version=__version__,
            vms=len(self.registry.vms),
            disks=len(disks),
            pending_records=sum(rt.pending.records for rt in disks.values()),
            orphaned_disks=orphaned,
            database=str(cfg.database),
            status_socket=str(cfg.status_socket),
            policy=cfg.policy.driver,
            hypervisor=cfg.hypervisor.driver,
        )

    def request_rescan(self) -> None:
        """List the VMs again now (SIGHUP, hypervisor events)."""
        self.registry.request_rescan()

    async def status_document(self) -> dict[str, Any]:
        """The ``vmreclaim status --json`` document (DESIGN.md section 8)."""
        assert self._document is not None, "the daemon has not started"
        return await self._document.build()

    async def wait(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set (0) or a part of the daemon fails (1)."""
        stopper = asyncio.get_running_loop().create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *self._critical], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                bug(f"{task.get_name()} failed", exc)
                return 1
        return 0

    async def shutdown(self) -> None:
        """Stop listening, let reclaims in flight finish (within a lease), commit what
        was received, close everything."""
        cfg = self.config
        self.registry.refuse_new()
        for task in self._critical[1:]:
            task.cancel()
        await self.scheduler.stop(timeout=cfg.fence.lease_seconds + 2)
        await self.registry.close("host daemon stopping")
        if self.committer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.committer.drain(), 30)
        for task in self._critical:
            task.cancel()
        await asyncio.gather(*self._critical, return_exceptions=True)
        await self.registry.cancel_tasks()
        if self.reconciliations is not None:
            await self.reconciliations.close()
        if self.control is not None:
            await self.control.close()
        await self.status.close()
        self.metrics.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self._db_call(self.store.save_policy, cfg.policy.driver, self.policy.state())
            await self._db_call(self.store.close)
        self.images.close()
        with contextlib.suppress(Exception):
            self.hypervisor.close()
        self._db.shutdown(wait=True)
        self._work.shutdown(wait=False, cancel_futures=True)
        event(logging.INFO, "host.stopped", rejected_records=self.rejected_total)


async def _main(config: HostConfig) -> int:
    daemon = HostDaemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.request_rescan)
    try:
        await daemon.start()
        return await daemon.wait(stop)
    finally:
        await daemon.shutdown()


def run_host(config: HostConfig) -> int:
    """``vmreclaim host --config FILE``: run until SIGTERM or SIGINT; SIGHUP re-lists VMs."""
    setup_logging(config.log_level, config.log_format)
    soft, hard = raise_nofile_limit()
    event(logging.INFO, "host.descriptors", limit=soft, hard_limit=hard)
    return asyncio.run(_main(config))
