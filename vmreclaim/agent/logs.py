"""Logging that never writes while a fence has a filesystem frozen.

Where stderr goes is not the agent's choice (a file, journald, a pipe to a process that
itself writes to disk); a write that reaches a frozen filesystem blocks until the thaw.
So while any fence is up, log records wait in memory (bounded; the overflow is counted
and reported) and are written after the last thaw.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque

#: Records kept while held; older ones are dropped (and counted) beyond this.
MAX_HELD = 10_000


class HoldingHandler(logging.Handler):
    """Passes records to ``target`` except while held.

    (``hold_output``/``release_output``, not ``release``: ``logging.Handler.release``
    is the handler's lock, which ``handle`` calls after every record.)
    """

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target
        self._held = 0
        self._queue: deque[logging.LogRecord] = deque(maxlen=MAX_HELD)
        self._dropped = 0
        self._mutex = threading.Lock()

    def hold_output(self) -> None:
        with self._mutex:
            self._held += 1

    def release_output(self) -> None:
        with self._mutex:
            self._held = max(0, self._held - 1)
            if self._held:
                return
            queued, self._queue = list(self._queue), deque(maxlen=MAX_HELD)
            dropped, self._dropped = self._dropped, 0
        for record in queued:
            self.target.handle(record)
        if dropped:
            self.target.handle(
                logging.makeLogRecord(
                    {
                        "name": "vmreclaim.agent",
                        "levelno": logging.WARNING,
                        "levelname": "WARNING",
                        "msg": "%d log lines were dropped while filesystems were frozen",
                        "args": (dropped,),
                    }
                )
            )

    def emit(self, record: logging.LogRecord) -> None:
        with self._mutex:
            if self._held:
                if len(self._queue) == self._queue.maxlen:
                    self._dropped += 1
                record.getMessage()  # format args now: they may change before the thaw
                self._queue.append(record)
                return
        self.target.handle(record)


def setup(level: str) -> HoldingHandler:
    """The agent's logging: ``key=value``-ish lines on stderr, held during fences."""
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler = HoldingHandler(stream)
    root = logging.getLogger("vmreclaim")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return handler
