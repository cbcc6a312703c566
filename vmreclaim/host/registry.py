"""The VM registry: which VMs the daemon serves, their channels and their sessions.

It follows the hypervisor driver's list of VMs (at start, every
``reclaim.rescan_seconds``, and at once on a hypervisor event or SIGHUP): a new VM gets
a listener on its channel (a transport driver) and its disks are handed to the
scheduler; a VM that is gone loses its listener and session, and its disks' pending
ranges wait as orphans. Every connection on a VM's channel becomes an
:class:`~vmreclaim.host.session.AgentSession` of *that* VM, talking to the
:class:`~vmreclaim.host.session.SessionHost` it is given; once welcomed it is the VM's
agent (:meth:`VMRegistry.attach`), replacing an older one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from vmreclaim.core import loader
from vmreclaim.core.errors import HypervisorError, VMReclaimError
from vmreclaim.core.hypervisors import Hypervisor, VMInfo
from vmreclaim.core.transports import Transport
from vmreclaim.host.budget import Budgets
from vmreclaim.host.logs import bug, event, guest_event
from vmreclaim.host.metrics import HostMetrics
from vmreclaim.host.scheduler import Scheduler
from vmreclaim.host.session import AgentSession, SessionHost
from vmreclaim.host.store import DiskTotals

T = TypeVar("T")

#: Rejections logged per VM per minute; the rest are counted only.
REJECT_LOGS_PER_MINUTE = 20


@dataclass
class VMRuntime:
    """One VM: the hypervisor's last word on it, its listener and its agent."""

    info: VMInfo
    listener: asyncio.Task[None] | None = None
    session: AgentSession | None = None
    rejected: int = 0
    #: The VM had no channel when last seen: logged once per change, not every rescan.
    no_channel: bool = False
    _log_window: float = 0.0
    _logged: int = 0


class VMRegistry:
    """The VMs served; see the module docstring."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        scheduler: Scheduler,
        metrics: HostMetrics,
        executor: Executor,
        *,
        rescan_seconds: float,
    ) -> None:
        self._hypervisor = hypervisor
        self._scheduler = scheduler
        self._metrics = metrics
        self._executor = executor
        self._rescan_seconds = rescan_seconds
        self.vms: dict[str, VMRuntime] = {}
        #: What each VM's channel may cost (vmreclaim.host.budget).
        self.budgets = Budgets()
        self._host: SessionHost | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rescan_now = asyncio.Event()
        self._stopping = False
        self._hypervisor_down = False

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- following the hypervisor ----------------------------------------------------------

    def apply(
        self,
        infos: list[VMInfo],
        host: SessionHost | None = None,
        totals: dict[str, DiskTotals] | None = None,
    ) -> None:
        """Follow the hypervisor's list: new VMs get listeners, gone VMs lose them.

        ``host`` (given once, at start) is what every session of every VM talks to.
        """
        if host is not None:
            self._host = host
        seen = set()
        for info in infos:
            name = info.identity.name
            seen.add(name)
            vmrt = self.vms.get(name)
            if vmrt is None:
                vmrt = self.vms[name] = VMRuntime(info)
                event(
                    logging.INFO,
                    "vm.added",
                    vm=name,
                    disks=[d.id for d in info.disks],
                    channel=info.channel.driver if info.channel else None,
                )
            elif vmrt.info.channel != info.channel and vmrt.listener is not None:
                vmrt.listener.cancel()
                vmrt.listener = None
            vmrt.info = info
            for disk in info.disks:
                self._scheduler.track(disk, totals.get(disk.key) if totals is not None else None)
            if vmrt.listener is None and info.channel is not None and not self._stopping:
                vmrt.listener = self._spawn(self._listen(name), f"listen:{name}")
            if (info.channel is None) != vmrt.no_channel:
                vmrt.no_channel = info.channel is None
                if vmrt.no_channel:
                    # A stopped VM has no channel until it starts (libvirt's socket path
                    # comes from the live XML): that is news, not a fault.
                    level = logging.WARNING if info.running else logging.INFO
                    event(level, "vm.no_channel", vm=name, running=info.running)
        for name in set(self.vms) - seen:
            vmrt = self.vms.pop(name)
            if vmrt.listener is not None:
                vmrt.listener.cancel()
            if vmrt.session is not None:
                self._spawn(vmrt.session.close("VM removed by the hypervisor"), f"close:{name}")
            for disk in vmrt.info.disks:
                self._scheduler.untrack(disk.key)
            self.budgets.forget(name)
            event(logging.INFO, "vm.removed", vm=name)

    async def _listen(self, name: str) -> None:
        backoff = 1.0
        while not self._stopping:
            vmrt = self.vms.get(name)
            if vmrt is None or vmrt.info.channel is None:
                return
            spec = vmrt.info.channel
            try:
                transport = loader.load_driver("transports", spec.driver, Transport, spec.options)

                async def handler(
                    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
                ) -> None:
                    current = self.vms.get(name)
                    if current is None or self._stopping or self._host is None:
                        writer.close()
                        return
                    budget = self.budgets.vm(name)
                    with budget.connection() as admitted:
                        if not admitted:
                            # Closed at once: one VM's idle connections hold no descriptors.
                            guest_event(name, logging.WARNING, "agent.too_many_connections", peer=peer)
                            writer.transport.abort()
                            return
                        try:
                            await AgentSession(self._host, current.info, reader, writer, peer, budget).run()
                        except Exception as exc:  # a bug in a session must not reach the others
                            bug(f"session of VM {name} failed", exc)

                event(logging.INFO, "channel.listening", vm=name, channel=transport.describe())
                await transport.serve(handler)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a transport that cannot listen now may later
                if not isinstance(exc, VMReclaimError | OSError):
                    bug(f"transport of VM {name} failed", exc)
                event(logging.ERROR, "channel.failed", vm=name, error=str(exc), retry_seconds=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)

    async def run_rescans(self) -> None:
        """List the VMs again every ``rescan_seconds``, or at once when asked (runs until cancelled)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan_now.wait(), self._rescan_seconds)
            self._rescan_now.clear()
            try:
                infos = await self._thread(self._hypervisor.vms)
            except HypervisorError as exc:
                if not self._hypervisor_down:  # once per outage, not at every rescan
                    event(logging.WARNING, "hypervisor.unavailable", error=str(exc))
                self._hypervisor_down = True
                continue
            if self._hypervisor_down:
                event(logging.INFO, "hypervisor.available")
                self._hypervisor_down = False
            self.apply(infos)

    def request_rescan(self) -> None:
        self._rescan_now.set()

    # -- sessions ---------------------------------------------------------------------------

    def attach(self, session: AgentSession) -> None:
        """``session`` is now its VM's agent (an older one is closed)."""
        vmrt = self.vms.get(session.name)
        if vmrt is None:
            self._spawn(session.close("VM no longer served"), f"close:{session.name}")
            return
        old = vmrt.session
        vmrt.session = session
        if old is not None and old is not session and not old.closed:
            self._spawn(old.close("replaced by a newer connection"), f"close:{session.name}")
        self._count_agents()
        self._scheduler.mark((d.key for d in vmrt.info.disks), retry_now=True)

    def detach(self, session: AgentSession) -> None:
        vmrt = self.vms.get(session.name)
        if vmrt is not None and vmrt.session is session:
            vmrt.session = None
        self._count_agents()

    def _count_agents(self) -> None:
        self._metrics.agents.set(sum(1 for v in self.vms.values() if v.session is not None))

    def count_rejected(self, vm: str) -> bool:
        """Count a refused message of ``vm``; whether to log it (at most 20 a minute)."""
        vmrt = self.vms.get(vm)
        if vmrt is None:
            return False
        vmrt.rejected += 1
        now = time.monotonic()
        if now - vmrt._log_window > 60:
            vmrt._log_window, vmrt._logged = now, 0
        vmrt._logged += 1
        if vmrt._logged == REJECT_LOGS_PER_MINUTE + 1:
            event(logging.WARNING, "record.rejected_suppressed", vm=vm, for_seconds=60)
        return vmrt._logged <= REJECT_LOGS_PER_MINUTE

    # -- what the scheduler asks (:class:`~vmreclaim.host.scheduler.ServedVMs`) ------------

    async def refresh(self, vm: str) -> VMInfo | str:
        """The hypervisor's description of ``vm`` now (kept), or why there is none."""
        vmrt = self.vms.get(vm)
        if vmrt is None:
            return f"VM {vm} is not served"
        try:
            info = await self._thread(self._hypervisor.refresh, vmrt.info.identity)
        except HypervisorError as exc:
            return f"hypervisor cannot describe VM {vm}: {exc}"
        if info is None:
            return f"VM {vm} no longer exists"
        vmrt.info = info
        return info

    def agent(self, vm: str) -> AgentSession | None:
        vmrt = self.vms.get(vm)
        return vmrt.session if vmrt is not None else None

    # -- stopping ---------------------------------------------------------------------------

    def refuse_new(self) -> None:
        """From now on, no new listener and no new session (the daemon is stopping)."""
        self._stopping = True

    async def close(self, why: str) -> None:
        """Stop listening and close every session."""
        self._stopping = True
        for vmrt in self.vms.values():
            if vmrt.listener is not None:
                vmrt.listener.cancel()
        for vmrt in list(self.vms.values()):
            if vmrt.session is not None:
                await vmrt.session.close(why)

    async def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
