"""The format ledger: the format each disk image was first read as, kept across restarts.

A format decides which bytes of an image are metadata and where a guest byte lives, so
a format that changes under a running daemon is either an operator's deliberate change
or an attack (a header written by the guest into its raw disk, DESIGN.md section 4
rule 6). The ledger remembers, in the deletion database (table ``disk_formats``), the
format an image path was first served with — the operator's or the hypervisor's word,
or what ``auto`` detected once — and from then on:

* a disk configured ``auto`` is read as its remembered format, never probed again (a
  restart does not re-open the question a guest could have prepared an answer for);
* when the hypervisor or the configuration names a *different* format for the same
  path, that disk is refused (nothing is punched, the attempt says why, the log has an
  ``image.format_changed`` line) until the operator confirms the new format with
  ``vmreclaim host --config FILE --confirm-format PATH=FORMAT`` (the daemon stopped:
  the database is the daemon's alone), which replaces the remembered format.

The ledger uses its own SQLite connection to the daemon's database (WAL lets it write
beside the database thread; it writes once per new disk), so that image opening, which
runs on worker threads, never waits for a group commit.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

from vmreclaim.core.errors import UnsupportedImageError, UsageError
from vmreclaim.host.logs import event

_SCHEMA = """
CREATE TABLE IF NOT EXISTS disk_formats (
    path TEXT PRIMARY KEY,
    disk TEXT NOT NULL,
    format TEXT NOT NULL,
    source TEXT NOT NULL,
    since REAL NOT NULL
);
"""


class FormatChangedError(UnsupportedImageError):
    """The format named for a disk is not the one the ledger has for its image."""


class FormatLedger:
    """Remembered formats per image path; see the module docstring."""

    def __init__(self, database: str | Path) -> None:
        self.database = Path(database)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.database, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 10000")
        self._db.executescript(_SCHEMA)
        rows = self._db.execute("SELECT path, format FROM disk_formats").fetchall()
        self._known: dict[str, str] = {str(p): str(f) for p, f in rows}

    def known(self, path: Path) -> str | None:
        """The format remembered for ``path``, if any."""
        return self._known.get(str(path))

    def check(self, path: Path, disk: str, fmt: str, source: str) -> None:
        """Remember ``fmt`` for ``path`` if new; raise :class:`FormatChangedError` if the
        ledger already has another format for it."""
        with self._lock:
            known = self._known.get(str(path))
            if known == fmt:
                return
            if known is not None:
                event(
                    logging.ERROR,
                    "image.format_changed",
                    disk=disk,
                    path=str(path),
                    remembered=known,
                    now=fmt,
                    source=source,
                )
                raise FormatChangedError(
                    f"disk {disk}: {source} names format {fmt!r} for {path}, but it has been served as "
                    f"{known!r}; nothing is punched until the operator confirms the change "
                    f"(vmreclaim host --config FILE --confirm-format {path}={fmt})"
                )
            self._db.execute(
                "INSERT INTO disk_formats VALUES (?, ?, ?, ?, ?) ON CONFLICT (path) DO NOTHING",
                (str(path), disk, fmt, source, time.time()),
            )
            self._known[str(path)] = fmt

    def close(self) -> None:
        with self._lock:
            self._db.close()


def confirm_format(database: str | Path, path: Path, fmt: str) -> str | None:
    """The operator's word: ``path`` is now ``fmt``. Returns the format it replaces.

    Runs while the daemon is stopped (it takes the database's lock file, as the daemon
    does), so that the daemon reads the confirmed format at its next start.
    """
    from vmreclaim.host.store import DeletionStore

    store = DeletionStore(database)  # the lock: refuses while a daemon runs
    try:
        ledger = FormatLedger(database)
        try:
            old = ledger.known(path)
            with ledger._lock:
                ledger._db.execute(
                    "INSERT INTO disk_formats VALUES (?, ?, ?, 'operator', ?) ON CONFLICT (path) DO UPDATE "
                    "SET format = excluded.format, source = 'operator', since = excluded.since",
                    (str(path), "", fmt, time.time()),
                )
            event(logging.WARNING, "image.format_confirmed", path=str(path), format=fmt, was=old)
            return old
        finally:
            ledger.close()
    finally:
        store.close()


def parse_confirmation(text: str) -> tuple[Path, str]:
    """``PATH=FORMAT`` as given to ``--confirm-format``."""
    path, sep, fmt = text.rpartition("=")
    if not sep or not path or not fmt:
        raise UsageError(f"--confirm-format {text!r}: expected PATH=FORMAT")
    return Path(path), fmt
