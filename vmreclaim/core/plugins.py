"""The plugin manager: one typed method per hook, so callers never spell hook names.

Only :class:`vmreclaim.core.pipeline.Pipeline` calls these methods: the rest of the code
goes through the pipeline's stages.

``Plugins`` wraps a pluggy ``PluginManager`` (the model is tox 4's ``manager.py``):
it loads the hook specs and every plugin registered in the entry-point group
``vmreclaim.hooks``, then runs ``check_pending()`` so a misspelt
hook implementation fails at start, not silently.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from vmreclaim.core import hookspecs
from vmreclaim.core.formats import Image
from vmreclaim.core.hookspecs import HOOKS_GROUP, PROJECT
from vmreclaim.core.lease import Lease
from vmreclaim.core.model import DeletionRecord, Disk, VMIdentity
from vmreclaim.core.policies import Decision
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.reclaim import ReclaimPlan, ReclaimReport


class Plugins:
    """The hook plugins of one process (agent, host daemon or CLI command)."""

    def __init__(self, plugins: Iterable[object] = (), *, load_entry_points: bool = True) -> None:
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(hookspecs)
        if load_entry_points:
            self.manager.load_setuptools_entrypoints(HOOKS_GROUP)
        for plugin in plugins:
            self.manager.register(plugin)
        self.manager.check_pending()

    def register(self, plugin: object, name: str | None = None) -> None:
        self.manager.register(plugin, name=name)
        self.manager.check_pending()

    @property
    def _hook(self) -> Any:
        return self.manager.hook

    # -- one method per hook, in pipeline order ------------------------------------------

    def capture_filter(self, *, mount: str, device: str, ranges: RangeSet) -> RangeSet:
        answers = self._hook.vmreclaim_capture_filter(mount=mount, device=device, ranges=ranges)
        return _narrow(ranges, answers)

    def verify_filter(self, *, mount: str, device: str, ranges: RangeSet) -> RangeSet:
        answers = self._hook.vmreclaim_verify_filter(mount=mount, device=device, ranges=ranges)
        return _narrow(ranges, answers)

    def record_received(self, *, vm: VMIdentity, record: DeletionRecord) -> None:
        self._hook.vmreclaim_record_received(vm=vm, record=record)

    def record_rejected(self, *, vm: VMIdentity, reason: str) -> None:
        self._hook.vmreclaim_record_rejected(vm=vm, reason=reason)

    def decide_veto(self, *, disk: Disk, pending_bytes: int, decision: Decision) -> str | None:
        veto: str | None = self._hook.vmreclaim_decide_veto(
            disk=disk, pending_bytes=pending_bytes, decision=decision
        )
        return veto

    def translate_filter(
        self, *, disk: Disk, image: Image, plan: ReclaimPlan, lease: Lease | None
    ) -> ReclaimPlan:
        answers = self._hook.vmreclaim_translate_filter(disk=disk, image=image, plan=plan, lease=lease)
        allowed = _narrow(plan.punch, answers)
        return plan if allowed == plan.punch else plan.narrowed(allowed, "vetoed by a plugin")

    def reclaim_done(self, *, disk: Disk, report: ReclaimReport) -> None:
        self._hook.vmreclaim_reclaim_done(disk=disk, report=report)

    # -- outside the pipeline ------------------------------------------------------------

    def cli_add_commands(self, *, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        self._hook.vmreclaim_cli_add_commands(commands=commands)


def _narrow(ranges: RangeSet, answers: list[RangeSet | None]) -> RangeSet:
    """Intersect ``ranges`` with every non-``None`` answer: filters can only narrow."""
    for answer in answers:
        if answer is not None:
            ranges = ranges.intersect(answer)
    return ranges


@dataclass(frozen=True)
class InstalledHookPlugin:
    """One entry point of ``vmreclaim.hooks``, as ``vmreclaim plugins`` shows it."""

    name: str
    target: str
    distribution: str
    version: str
    #: The hook specs it implements, in the order of ``hookspecs.py``.
    hooks: tuple[str, ...]
    error: str | None = None


def installed_hook_plugins() -> list[InstalledHookPlugin]:
    """Every hook plugin registered in ``vmreclaim.hooks``, sorted by name, with the
    hooks it implements; one that fails to import is listed with its error."""
    specs = [name for name in vars(hookspecs) if name.startswith("vmreclaim_")]
    marker = f"{PROJECT}_impl"  # the attribute pluggy's HookimplMarker sets
    found = []
    for ep in importlib.metadata.entry_points(group=HOOKS_GROUP):
        dist = ep.dist
        hooks: tuple[str, ...] = ()
        error = None
        try:
            plugin = ep.load()
        except Exception as exc:  # any import-time failure is reported, not raised
            error = f"{type(exc).__name__}: {exc}"
        else:
            hooks = tuple(s for s in specs if hasattr(getattr(plugin, s, None), marker))
        found.append(
            InstalledHookPlugin(
                name=ep.name,
                target=ep.value,
                distribution=dist.metadata["Name"] if dist is not None else "?",
                version=dist.version if dist is not None else "?",
                hooks=hooks,
                error=error,
            )
        )
    return sorted(found, key=lambda p: p.name)
