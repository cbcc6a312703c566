"""The spool: records the host has not acknowledged, kept across restarts and kill -9.

Why SQLite (the standard library's ``sqlite3``) and not an append-only file: records
leave the spool in any order (the host acknowledges them as they become durable on
its side), and an append-only log would need its own compaction, torn-tail recovery
and fsync discipline to get what one transactional table gives. A writer thread commits
what has queued since its last transaction, with ``synchronous=FULL`` (fsynced: it
survives a kill -9 and a guest crash); a deletion after an ``ack`` that is lost only
means the host sees that record again, which it treats as a duplicate.

A copy of every pending record is also kept in memory, so that while a fence has frozen
the filesystem holding the spool the agent never touches the database at all — not even
to read, since SQLite's WAL index is a shared memory map whose first write to a frozen
filesystem would block. While :meth:`Spool.hold` is in effect, inserts and deletions
queue in memory; :meth:`Spool.release` lets the writer thread catch up.

The spool is bounded by ``max_bytes`` of record text; beyond it the oldest records are
dropped with a warning (they only cost unreclaimed space, never safety).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

from vmreclaim.core.errors import AgentSetupError

log = logging.getLogger("vmreclaim.agent")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, disk TEXT NOT NULL, line BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Spool:
    """Unacknowledged records, durable in ``directory/spool.sqlite``.

    Called from the agent's event loop; a writer thread does the database work, so a
    slow fsync (or a filesystem frozen by someone else) never stalls the loop.
    """

    FILENAME = "spool.sqlite"

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.path = directory / self.FILENAME
        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        self._held = 0
        self._stop = False
        self._writing = False
        #: ``next_seq`` moved since it was last written (a record may be acked before it
        #: ever reached the database; its number must still never be used again).
        self._seq_dirty = False
        self._to_insert: dict[int, tuple[str, bytes]] = {}
        self._to_delete: set[int] = set()
        self.pending: OrderedDict[int, tuple[str, bytes]] = OrderedDict()
        self.bytes = 0
        self.dropped = 0
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            rows = self.db.execute("SELECT seq, disk, line FROM records ORDER BY seq").fetchall()
            row = self.db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        except (OSError, sqlite3.Error) as exc:
            raise AgentSetupError(f"spool {self.path}: {exc}") from exc
        for seq, disk, line in rows:
            self.pending[int(seq)] = (str(disk), bytes(line))
            self.bytes += len(line)
        top = max(self.pending, default=-1) + 1
        self.next_seq = max(top, int(row[0]) if row else 0)
        self._thread = threading.Thread(target=self._run, name="vmreclaim-spool", daemon=True)
        self._thread.start()

    # -- use ------------------------------------------------------------------------------

    def reserve(self) -> int:
        """The next sequence number (never reused, even after every record is acked)."""
        with self._cond:
            seq = self.next_seq
            self.next_seq += 1
            self._seq_dirty = True
            self._cond.notify_all()
            return seq

    def add(self, seq: int, disk: str, line: bytes) -> None:
        """Keep a record line until it is acknowledged; written at once unless held."""
        with self._cond:
            self.pending[seq] = (disk, line)
            self.bytes += len(line)
            self._to_insert[seq] = (disk, line)
            self._trim()
            self._cond.notify_all()

    def remove(self, seq: int) -> bool:
        """Forget an acknowledged (or refused) record; False if it was not pending."""
        with self._cond:
            item = self.pending.pop(seq, None)
            if item is None:
                return False
            self.bytes -= len(item[1])
            if self._to_insert.pop(seq, None) is None:
                self._to_delete.add(seq)
            self._cond.notify_all()
            return True

    def hold(self) -> None:
        """Stop touching the database (a fence is freezing its filesystem)."""
        with self._cond:
            self._held += 1

    def release(self) -> None:
        with self._cond:
            self._held = max(0, self._held - 1)
            self._cond.notify_all()

    @property
    def held(self) -> bool:
        return self._held > 0

    def wait_synced(self, timeout: float = 10.0) -> bool:
        """Block until everything queued is in the database (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: bool(self._held) or not (self._queued() or self._writing), timeout
            )

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.db.close()

    # -- internals ------------------------------------------------------------------------

    def _trim(self) -> None:
        while self.bytes > self.max_bytes and len(self.pending) > 1:
            seq, (_disk, line) = self.pending.popitem(last=False)
            self.bytes -= len(line)
            self.dropped += 1
            if self._to_insert.pop(seq, None) is None:
                self._to_delete.add(seq)
            log.warning(
                "spool %s is over %d bytes: dropped record %d (%d bytes) unsent",
                self.path,
                self.max_bytes,
                seq,
                len(line),
            )

    def _queued(self) -> bool:
        return bool(self._to_insert or self._to_delete or self._seq_dirty)

    def _ready(self) -> bool:
        return self._stop or (not self._held and self._queued())

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(self._ready)
                if self._held or not self._queued():
                    return  # stopping: nothing left, or a fence holds us (write nothing)
                inserts = [(s, d, ln) for s, (d, ln) in self._to_insert.items()]
                deletes = [(s,) for s in self._to_delete]
                next_seq = self.next_seq
                self._to_insert, self._to_delete, self._seq_dirty = {}, set(), False
                self._writing = True
            ok = self._write(inserts, deletes, next_seq)
            with self._cond:
                self._writing = False
                if not ok:
                    for s, d, ln in inserts:
                        if s in self.pending:
                            self._to_insert.setdefault(s, (d, ln))
                    self._to_delete.update(s for (s,) in deletes)
                    self._seq_dirty = True
                self._cond.notify_all()
            if not ok:
                time.sleep(1.0)

    def _write(self, inserts: list[tuple[int, str, bytes]], deletes: list[tuple[int]], next_seq: int) -> bool:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            if inserts:
                self.db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?)", inserts)
            if deletes:
                self.db.executemany("DELETE FROM records WHERE seq = ?", deletes)
            self.db.execute(
                "INSERT INTO meta VALUES ('next_seq', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (next_seq,),
            )
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            log.error("spool %s: cannot write (%s); records stay in memory", self.path, exc)
            return False
        return True
