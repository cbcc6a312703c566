"""Hooks: an audit log of reclaims, and a pause file that postpones them."""

from __future__ import annotations

import json
import os
import time

from vmreclaim import hookimpl
from vmreclaim.core.model import Disk
from vmreclaim.core.policies import Decision
from vmreclaim.core.reclaim import ReclaimReport


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
