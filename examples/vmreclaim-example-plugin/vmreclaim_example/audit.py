"""Hooks: an audit log of reclaims, a pause file that postpones them, and no punch
started under a fence with too little of its lease left."""

from __future__ import annotations

import json
import os
import time

from vmreclaim import hookimpl
from vmreclaim.core.lease import Lease
from vmreclaim.core.model import Disk
from vmreclaim.core.policies import Decision
from vmreclaim.core.ranges import RangeSet
from vmreclaim.core.reclaim import ReclaimPlan, ReclaimReport


@hookimpl
def vmreclaim_reclaim_done(disk: Disk, report: ReclaimReport) -> None:
    path = os.environ.get("VMRECLAIM_AUDIT_LOG")
    if path:
        line = {"time": time.time(), "disk": disk.key, **report.to_json()}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


@hookimpl
def vmreclaim_decide_veto(disk: Disk, decision: Decision) -> str | None:
    pause = os.environ.get("VMRECLAIM_PAUSE_FILE")
    if pause and os.path.exists(pause):
        return f"paused by {pause}"
    return None


@hookimpl
def vmreclaim_translate_filter(plan: ReclaimPlan, lease: Lease | None) -> RangeSet | None:
    # Under a fence the guest is frozen until the lease ends; a punch that cannot finish
    # in time is cut short by the core anyway, so rather keep nothing and let the next
    # fence (with a fresh lease) take the ranges.
    minimum = float(os.environ.get("VMRECLAIM_MIN_LEASE_SECONDS", "0"))
    if lease is not None and lease.remaining() < minimum:
        return RangeSet()
    return None
