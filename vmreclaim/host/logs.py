"""Structured logs: every line is one event with named fields.

``text`` (the default) prints ``TIME LEVEL event key=value ...`` for people and for
``grep``; ``json`` prints one JSON object per line for log shippers. Code logs with
:func:`event`, never with formatted sentences, so both forms carry the same fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from vmreclaim.host import budget

LOGGER = logging.getLogger("vmreclaim.host")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def event(level: int, name: str, **fields: Any) -> None:
    """Log event ``name`` (``record.rejected``, ``reclaim.done``) with ``fields``."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, name, extra={"fields": fields})


_guest_windows: dict[str, list[float]] = {}  # vm -> [window start, lines, suppressed]


def guest_event(vm: str, level: int, name: str, **fields: Any) -> None:
    """Log an event a guest can cause at will (a connection, its ``error`` message, a
    refused line): at most ``Limits.log_lines_per_minute`` lines per VM and minute, each
    string cut to ``Limits.log_field_chars`` characters; the lines held back are counted
    and reported in one ``guest.log_suppressed`` line when the next minute starts. One
    guest's flood never fills the host's log (issue 11 item 4)."""
    if not LOGGER.isEnabledFor(level):
        return
    now = time.monotonic()
    window = _guest_windows.setdefault(vm, [now, 0, 0])
    if now - window[0] > 60:
        if window[2]:
            event(logging.WARNING, "guest.log_suppressed", vm=vm, lines=int(window[2]), seconds=60)
        window[:] = [now, 0, 0]
    limits = budget.DEFAULT_LIMITS
    window[1] += 1
    if window[1] > limits.log_lines_per_minute:
        window[2] += 1
        return
    chars = limits.log_field_chars
    cut = {k: (v[:chars] + "...") if isinstance(v, str) and len(v) > chars else v for k, v in fields.items()}
    event(level, name, vm=vm, **cut)


def bug(what: str, exc: BaseException | None) -> None:
    """Log an unexpected exception with its traceback: a bug somewhere, not a guest's
    fault; the daemon goes on serving."""
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    LOGGER.error("host.bug", exc_info=exc_info, extra={"fields": {"what": what}})


def _timestamp(record: logging.LogRecord) -> str:
    ms = int(record.msecs)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z"


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000Z INFO reclaim.done vm=vm1 disk=disk0 freed_bytes=4096``"""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [_timestamp(record), record.levelname, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append("traceback=" + json.dumps(self.formatException(record.exc_info)))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": "info", "event": "reclaim.done", "vm": "vm1", ...}``"""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str, fmt: str) -> None:
    """Send the daemon's events to stderr (journald picks them up under systemd)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(_LEVELS.get(level, logging.INFO))
    LOGGER.propagate = False
