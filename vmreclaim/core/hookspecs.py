"""Hook specifications: every pipeline event a plugin can observe or extend.

The pipeline, in order (this is the one place the order is written down; the diagram is
in ``docs/architecture.md``)::

    guest agent                                     host daemon
    ───────────                                     ───────────
    1 capture   vmreclaim_capture_filter            vmreclaim_record_received   (observe)
    2 verify    vmreclaim_verify_filter             vmreclaim_record_rejected   (observe)
        │                                           3 decide    vmreclaim_decide_veto
        └──── record over the VM's channel ───►     4 translate vmreclaim_translate_filter
                                                    5 reclaim   (the core punches; no hook)
                                                                vmreclaim_reclaim_done (observe)

Outside the pipeline, ``vmreclaim_cli_add_commands`` lets a plugin (a driver's companion
module, say) add its own subcommands to the ``vmreclaim`` command line.

Rules every hook follows:

* Hooks are called with keyword arguments only, and specs only ever *gain* parameters:
  pluggy passes an implementation just the arguments it names, so old plugins keep
  working.
* A *filter* hook (``*_filter``) may only narrow: the pipeline intersects every
  non-``None`` answer with its input, so no plugin can widen what is punched.
* Choosing a driver (format, hypervisor, policy, transport) is never a hook: drivers
  are loaded by name (:mod:`vmreclaim.core.loader`). The punch itself is the core's
  (``fallocate``); a storage-side unmap (an array's own call) would be a driver kind,
  not a hook — there is none yet.
* Every pipeline hook is called by :class:`vmreclaim.core.pipeline.Pipeline`, nowhere
  else (the CLI's ``vmreclaim_cli_add_commands`` is no pipeline event: the CLI calls it).

A plugin writes ``from vmreclaim import hookimpl`` and registers its module in the
entry-point group ``vmreclaim.hooks``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import argparse

    from vmreclaim.core.formats import Image
    from vmreclaim.core.lease import Lease
    from vmreclaim.core.model import DeletionRecord, Disk, VMIdentity
    from vmreclaim.core.policies import Decision
    from vmreclaim.core.ranges import RangeSet
    from vmreclaim.core.reclaim import ReclaimPlan, ReclaimReport

PROJECT = "vmreclaim"
#: The entry-point group hook plugins register under.
HOOKS_GROUP = "vmreclaim.hooks"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Marker for hook implementations; re-exported as ``vmreclaim.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- 1. capture (guest agent) -----------------------------------------------------------


@hookspec
def vmreclaim_capture_filter(mount: str, device: str, ranges: RangeSet) -> RangeSet | None:
    """Narrow the candidate ranges a capture driver reported for one filesystem.

    Called in the guest agent after a capture driver (``fsmap``, ``fiemap``, ...) has
    collected candidate free ranges of a filesystem and before they are verified.

    :param mount: The mount point of the filesystem, as configured.
    :param device: The block device holding it (``/dev/vda1``).
    :param ranges: Candidate ranges, in bytes of ``device``.
    :returns: The ranges to keep, or ``None`` to keep all. Every implementation is
        called; the pipeline keeps the intersection of the answers.

    Wrappers are not expected.

    .. versionadded:: 0.1
    """


# -- 2. verify (guest agent) ------------------------------------------------------------


@hookspec
def vmreclaim_verify_filter(mount: str, device: str, ranges: RangeSet) -> RangeSet | None:
    """Say which of the ranges are free, committed and safe to report.

    Called in the guest agent after ``syncfs`` and after the agent's own GETFSMAP
    check, with the ranges that passed it, and again under a fence (FIFREEZE) when the
    host asks to re-verify before a punch.

    :param mount: The mount point of the filesystem.
    :param device: The block device holding it.
    :param ranges: Ranges believed free, in bytes of ``device``.
    :returns: The subset this plugin agrees is free, or ``None`` for no opinion.
        Every implementation is called; the pipeline keeps the intersection, so any
        plugin can veto a range and none can add one.

    Wrappers are not expected.

    .. versionadded:: 0.1
    """


# -- host: records arriving ---------------------------------------------------------------


@hookspec
def vmreclaim_record_received(vm: VMIdentity, record: DeletionRecord) -> None:
    """Observe a deletion record the host has validated and stored durably.

    Called in the host daemon once per record, after it is in the deletion database
    and before it is acknowledged to the agent.

    :param vm: The VM the record came from, as known from its channel.
    :param record: The validated record, offsets on the virtual disk.
    :returns: Nothing; results are ignored.

    .. versionadded:: 0.1
    """


@hookspec
def vmreclaim_record_rejected(vm: VMIdentity, reason: str) -> None:
    """Observe a message from a guest that the host refused.

    Called in the host daemon when a message is malformed, names a disk the VM does
    not have, or lies outside the disk. Nothing of it was stored.

    :param vm: The VM whose channel the message arrived on.
    :param reason: A sentence naming the problem.
    :returns: Nothing; results are ignored.

    .. versionadded:: 0.1
    """


# -- 3. decide (host) ---------------------------------------------------------------------


@hookspec(firstresult=True)
def vmreclaim_decide_veto(disk: Disk, pending_bytes: int, decision: Decision) -> str | None:
    """Postpone a reclaim the policy driver has approved.

    Called in the host daemon when the configured policy says a disk's pending ranges
    should be reclaimed now (``decision.reclaim`` is true), before anything is
    translated. Use it for maintenance windows, I/O budgets, or backups in progress.

    :param disk: The disk about to be reclaimed.
    :param pending_bytes: Bytes of deleted ranges waiting for that disk.
    :param decision: The policy's decision and its reason.
    :returns: A reason to postpone, or ``None`` to let it go ahead. The first
        non-``None`` answer wins and the remaining implementations are not called.

    .. versionadded:: 0.1
    """


# -- 4. translate (host and offline commands) --------------------------------------------


@hookspec
def vmreclaim_translate_filter(
    disk: Disk, image: Image, plan: ReclaimPlan, lease: Lease | None
) -> RangeSet | None:
    """Narrow the host ranges a reclaim is about to punch.

    Called after the format driver and the core have translated guest ranges into
    host byte ranges of ``image.data_file`` that are safe by the format's rules
    (DESIGN.md section 4, rule 3), aligned to host blocks, and before punching.

    :param disk: The disk being reclaimed (for offline commands, a disk named after
        the image file, with an empty ``vm``).
    :param image: The opened image.
    :param plan: The plan: ``plan.punch`` are the host ranges, ``plan.requested`` the
        guest ranges asked for.
    :param lease: Inside a fence (the host daemon's live punch), the time limit of the
        guest's freeze: ``lease.remaining()`` is what is left, and nothing is punched
        once it is over, so a filter should not take long. ``None`` when no guest is
        frozen (offline commands, offline mode).
    :returns: The host ranges to keep, or ``None`` to keep all. Every implementation
        is called; the pipeline keeps the intersection and reports what was dropped as
        skipped.

    Wrappers are not expected.

    .. versionadded:: 0.1
    """


# -- 5. reclaim (host and offline commands) ----------------------------------------------


@hookspec
def vmreclaim_reclaim_done(disk: Disk, report: ReclaimReport) -> None:
    """Observe a finished reclaim (also a dry run: ``report.dry_run``).

    Called after the core has punched (or, in the host's guest-trim mode, after the
    guest has trimmed: ``report.mode == "trim"``), with requested, punched and measured
    freed bytes.

    :param disk: The disk that was reclaimed.
    :param report: The outcome.
    :returns: Nothing; results are ignored.

    .. versionadded:: 0.1
    """


# -- outside the pipeline: the command line ---------------------------------------------


@hookspec
def vmreclaim_cli_add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add subcommands to the ``vmreclaim`` command line.

    Called once by the CLI while it builds its parser, after its own commands. An
    implementation calls ``commands.add_parser(...)`` and hands the chosen parser a
    function with :func:`vmreclaim.core.commands.set_command`; that function returns a
    :class:`~vmreclaim.core.commands.CommandOutput`, which the CLI prints (JSON with
    ``--json``, text otherwise) so every byte of output stays in the CLI.

    :param commands: The ``vmreclaim`` top-level subparsers.
    :returns: Nothing; results are ignored. Every implementation is called.

    Wrappers are not expected.

    .. versionadded:: 0.1
    """
