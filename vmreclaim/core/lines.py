"""Reading one protocol line from a channel, the same way at both ends.

docs/protocol.md frames messages as lines of at most
:data:`~vmreclaim.core.transports.MAX_LINE_BYTES`, and every transport opens its streams
with that limit. A longer line must neither be held in memory nor be parsed piecewise
as lines of its own (its tail could be a well-formed message the peer never meant to
send), so :func:`read_line` discards it whole, up to and including its newline, and
then reports it; the next call starts at a real line boundary. A last line cut off by
the end of the stream is not a message either: it is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.transports import MAX_LINE_BYTES


async def read_line(
    reader: asyncio.StreamReader,
    *,
    sender: str = "peer",
    on_partial: Callable[[int], None] | None = None,
) -> bytes | None:
    """The next line (with its newline), or ``None`` at the end of the stream.

    :param sender: Who sends, for the error message ("agent of VM vm1", "host").
    :param on_partial: Called with the length of a last line that had no newline
        (dropped), e.g. to log it.
    :raises ProtocolError: The line was longer than the reader's limit; it was
        discarded and the stream is at the start of the next line.
    """
    dropped = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if dropped:
                break
            if exc.partial and on_partial is not None:
                on_partial(len(exc.partial))
            return None
        except asyncio.LimitOverrunError as exc:
            dropped += len(await reader.readexactly(exc.consumed))
            continue
        if not dropped:
            return line
        dropped += len(line)
        break
    raise ProtocolError(
        f"{sender} line of {dropped} bytes exceeds the limit of {MAX_LINE_BYTES} bytes and was discarded"
    )
