"""The pipeline: runs each stage's own work and the hooks around it.

The stages and their order are documented once, in :mod:`vmreclaim.core.hookspecs`.
This object is what the agent, the host daemon and the offline commands call, and the
only caller of the hooks (:class:`~vmreclaim.core.plugins.Plugins`); it applies the
safety rules of DESIGN.md section 4 that are the same for every driver: filters only
narrow, a format's state is checked before translating, the punch is the core's own
``fallocate`` (checked against the fence lease before each call), and an offline punch
holds QEMU's write locks so a busy image is refused (exit 3) before any write.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from vmreclaim.core.errors import UnsupportedImageError
from vmreclaim.core.formats import Image
from vmreclaim.core.lease import Lease
from vmreclaim.core.model import DeletionRecord, Disk, VMIdentity
from vmreclaim.core.plugins import Plugins
from vmreclaim.core.policies import Decision, DiskState, Policy, StorageState
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.reclaim import ReclaimPlan, ReclaimReport, only_allocated, plan_reclaim


class Pipeline:
    """Stages 1–5 of vmreclaim, with the hook plugins of this process."""

    def __init__(self, plugins: Plugins | None = None) -> None:
        self.plugins = plugins if plugins is not None else Plugins()

    # -- guest side ------------------------------------------------------------------------

    def captured(self, mount: str, device: str, ranges: RangeSet) -> RangeSet:
        """Stage 1: candidates from a capture driver, narrowed by capture filters."""
        return self.plugins.capture_filter(mount=mount, device=device, ranges=ranges)

    def verified(self, mount: str, device: str, ranges: RangeSet) -> RangeSet:
        """Stage 2: ranges the agent's own check found free, narrowed by verify hooks."""
        return self.plugins.verify_filter(mount=mount, device=device, ranges=ranges)

    # -- host side -------------------------------------------------------------------------

    def record_received(self, vm: VMIdentity, record: DeletionRecord) -> None:
        """A record from ``vm`` is validated and durable: tell the observers."""
        self.plugins.record_received(vm=vm, record=record)

    def record_rejected(self, vm: VMIdentity, reason: str) -> None:
        """A message from ``vm``'s channel was refused: tell the observers."""
        self.plugins.record_rejected(vm=vm, reason=reason)

    def decide(
        self, disk: Disk, policy: Policy, state: DiskState, storage: StorageState, now: float
    ) -> Decision:
        """Stage 3: the policy's decision, which a plugin may postpone.

        The bound on waiting (:meth:`Policy.overdue`) comes before the driver's own rule.
        """
        decision = policy.overdue(state, now) or policy.decide(state, storage, now)
        if decision.reclaim:
            veto = self.plugins.decide_veto(disk=disk, pending_bytes=state.pending_bytes, decision=decision)
            if veto is not None:
                return Decision(False, f"postponed by a plugin: {veto}")
        return decision

    def translate(
        self,
        disk: Disk,
        image: Image,
        ranges: RangeSet,
        fd: int | None = None,
        lease: Lease | None = None,
    ) -> ReclaimPlan:
        """Stage 4: guest ranges → safe, block-aligned host ranges of the data file,
        narrowed by every ``vmreclaim_translate_filter`` hook.

        The one source of what a reclaim may touch: every mode acts on this plan and
        never on the caller's ranges — the punch on ``plan.punch``, the deep discard,
        a guest trim and an offline reclaim on ``plan.guest_ranges`` — so a plugin's
        veto holds whichever way the bytes are freed.
        """
        image.check_punchable()
        block = image.data_file.punch_block_size(fd if fd is not None else image.data_file.fd)
        plan = plan_reclaim(image, ranges, block)
        return self.plugins.translate_filter(disk=disk, image=image, plan=plan, lease=lease)

    def reclaim(
        self,
        disk: Disk,
        image: Image,
        ranges: RangeSet,
        *,
        dry_run: bool = False,
        deep: bool = False,
        fd: int | None = None,
        lease: Lease | None = None,
    ) -> ReclaimReport:
        """Stages 4 and 5: translate ``ranges`` and punch them.

        Without ``fd`` this is an offline reclaim: the data file is opened for writing
        under QEMU's lock protocol and a busy image raises
        :class:`~vmreclaim.core.errors.ImageBusyError` before anything is written. A
        caller that passes ``fd`` (the host daemon, inside a fence) has established
        the safety of a live punch itself; with ``lease`` (the fence's time limit) no
        byte is punched once it is over (:class:`~vmreclaim.core.errors.FenceError`).
        """
        if deep and not image.capabilities.deep_reclaim:
            reason = image.deep_reclaim_refusal() or f"{image.format_name} images have no deep reclaim mode"
            raise UnsupportedImageError(f"{image.file.path}: {reason}")
        mode = "deep" if deep else "punch"
        holder: AbstractContextManager[int] = (
            nullcontext(fd) if fd is not None else image.data_file.hold_for_writing()
        )
        with holder as write_fd:
            plan = self.translate(disk, image, ranges, write_fd, lease)
            # Only bytes the file holds are punched and counted: a dry run then reports
            # what a real run frees, and ranges punched before do not count twice. The
            # deep discard below still acts on the whole plan: a cluster whose bytes are
            # already a hole keeps its qcow2 mapping until QEMU discards it.
            held = only_allocated(plan, image.data_file, write_fd)
            if dry_run:
                punched, freed = held.punch_bytes, 0
            else:
                if lease is not None:
                    lease.check()  # translating may have used up the lease
                result = image.data_file.punch(write_fd, held.punch, lease)
                image.data_file.sync(write_fd)
                punched, freed = result.punched_bytes, result.freed_bytes
        if deep and not dry_run and plan.guest_ranges:
            # After our locks are gone: the driver goes through QEMU's own tools, which
            # take QEMU's locks themselves and refuse if a VM started meanwhile. Only
            # the filtered plan's guest ranges: a range a hook vetoed is never discarded.
            before = image.allocated_bytes()
            image.deep_discard(plan.guest_ranges)
            freed += before - image.allocated_bytes()
        report = ReclaimReport(
            requested_bytes=plan.requested_bytes,
            punched_bytes=punched,
            freed_bytes=freed,
            skipped=plan.skipped if deep else held.skipped,
            dry_run=dry_run,
            mode=mode,
        )
        self.plugins.reclaim_done(disk=disk, report=report)
        return report

    def trimmed(self, disk: Disk, report: ReclaimReport) -> None:
        """Stage 5 done by the guest (the host's guest-trim mode): tell the observers."""
        self.plugins.reclaim_done(disk=disk, report=report)
