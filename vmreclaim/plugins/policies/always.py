"""Policy ``always``: reclaim every pending range as soon as it is stored."""

from __future__ import annotations

from vmreclaim.core.policies import Decision, DiskState, Policy, StorageState


class AlwaysPolicy(Policy):
    """Reclaim whenever a disk has pending bytes; useful for tests and small hosts."""

    def decide(self, disk: DiskState, storage: StorageState, now: float) -> Decision:
        if disk.pending_bytes > 0:
            return Decision(True, f"{disk.pending_bytes} bytes pending")
        return Decision(False, "nothing pending")
