"""The time limit of a live punch: a fence's lease, as the punching side counts it.

A guest agent keeps its filesystem frozen for a lease counted from when it *received*
the host's ``fence`` request, then thaws whatever happens (DESIGN.md section 4, rule 2).
The host cannot know when that was, only when it *sent* the request, which is earlier;
so a :class:`Lease` built from the send time, minus a safety margin, always ends before
the agent's does. Every punch path checks it before each write
(:func:`vmreclaim.core.punch.punch_holes`), so nothing is punched once the guest may be
writing again. A lease is also revoked early when its channel drops: the agent thaws
when it loses the host.
"""

from __future__ import annotations

import time

from vmreclaim.core.errors import FenceError


class Lease:
    """A deadline on :func:`time.monotonic`'s clock that can also be revoked.

    Checked from worker threads while the event loop that owns the fence may revoke
    it; the two attributes are each set once, so no lock is needed.
    """

    def __init__(self, deadline: float, *, what: str = "fence") -> None:
        self.deadline = deadline
        self.what = what
        self.revoked: str | None = None

    @classmethod
    def starting(cls, sent_at: float, seconds: float, margin: float, *, what: str = "fence") -> Lease:
        """The lease of a fence requested at ``sent_at`` for ``seconds``, less ``margin``."""
        return cls(sent_at + seconds - margin, what=what)

    def remaining(self) -> float:
        """Seconds left; zero or less once over (or revoked)."""
        if self.revoked is not None:
            return 0.0
        return self.deadline - time.monotonic()

    def revoke(self, reason: str) -> None:
        """End the lease now (the channel to the agent dropped, the daemon stops)."""
        if self.revoked is None:
            self.revoked = reason

    def check(self) -> None:
        """Raise :class:`FenceError` unless the lease still holds."""
        if self.revoked is not None:
            raise FenceError(f"{self.what}: lease revoked ({self.revoked}); nothing more is punched")
        late = time.monotonic() - self.deadline
        if late >= 0:
            raise FenceError(f"{self.what}: lease ended {late:.3f}s ago; nothing more is punched")
