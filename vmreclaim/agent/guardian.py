"""The thaw guardian: a tiny separate process that thaws what the agent froze.

The agent's own watchdog thread thaws a fence when its lease runs out even if the
event loop is stuck, but a thread dies with its process: after a ``kill -9`` (or an
OOM kill) in the middle of a fence nothing would ever thaw the filesystem, and every
writer in the guest would hang. So the agent starts this process once, before any
fence, and tells it over a pipe what it is about to freeze and until when:

    arm KEY DEADLINE PATH     (DEADLINE on CLOCK_MONOTONIC, shared by all processes)
    disarm KEY

The guardian thaws an armed mount at its deadline (the agent arms it a little after
the lease, so normally the agent has thawed and disarmed first), and thaws everything
armed at once when the pipe closes without a ``disarm`` — the agent is gone. It uses
only the standard library, writes nothing anywhere (its output goes to /dev/null: a
log line to a frozen filesystem would block it) and exits when the pipe closes.
"""

from __future__ import annotations

import fcntl
import os
import select
import sys
import time

from vmreclaim.agent.ioctls import FITHAW

#: After the agent died, a freeze it had started may still complete: keep trying this long.
RETRY_SECONDS = 3.0


def _thaw(fd: int) -> bool:
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError:
        return False  # EINVAL: not frozen (already thawed)
    return True


def main() -> int:
    armed: dict[str, tuple[float, list[int]]] = {}
    pipe = sys.stdin.fileno()
    buf = b""
    while True:
        now = time.monotonic()
        for key in [k for k, (deadline, _) in armed.items() if deadline <= now]:
            for fd in armed.pop(key)[1]:
                _thaw(fd)
                os.close(fd)
        timeout = max(0.0, min(d for d, _ in armed.values()) - now) if armed else None
        ready, _, _ = select.select([pipe], [], [], timeout)
        if not ready:
            continue
        data = os.read(pipe, 65536)
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            verb, _, rest = line.decode("utf-8", "surrogateescape").partition(" ")
            if verb == "arm":
                key, deadline, path = rest.split(" ", 2)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    continue
                entry = armed.setdefault(key, (float(deadline), []))
                entry[1].append(fd)
            elif verb == "disarm":
                for fd in armed.pop(rest, (0.0, []))[1]:
                    os.close(fd)
    # The agent is gone. Whatever it left armed is thawed now, and again for a moment in
    # case a FIFREEZE it had under way completes after it died.
    left = {fd for _, group in armed.values() for fd in group}
    end = time.monotonic() + RETRY_SECONDS
    while left and time.monotonic() < end:
        left = {fd for fd in left if not _thaw(fd)}
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
