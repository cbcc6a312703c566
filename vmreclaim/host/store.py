"""The deletion database (the source design's module 32): SQLite in WAL mode.

A record is acknowledged to its agent only after the transaction holding it has
committed (``synchronous=FULL``: the commit has reached the disk, so neither a SIGKILL
of the daemon nor a power cut loses an acknowledged record). Everything the daemon must
remember across a restart lives here::

    meta      (key, value)             schema version, policy state (JSON)
    records   (id, disk, seq, received, bytes, count, ranges)
              pending deletion records of each disk ("vm/disk"), as received; the
              ranges are a BLOB of little-endian int64 (start, end) pairs
    disks     (key, vm, disk, received_records, received_bytes, requested_bytes,
               verified_bytes, punched_bytes, freed_bytes, reclaims, last_reclaim)
    reclaims  (id, disk, started, finished, mode, outcome, requested_bytes,
               verified_bytes, punched_bytes, freed_bytes, detail)   recent attempts
    counters  (name, value)            rejected records per VM
    disk_formats (path, disk, format, source, since)
              the format each image was first served with (vmreclaim.host.formats)

A reclaim that handled a disk's records up to id ``upto`` deletes them, and stores what
it did not try (a backlog larger than one fence) as one new record, in the same
transaction that adds its totals. Replaying a record after a crash is harmless: the
pending ranges of a disk are a union, and punching a hole twice frees nothing twice.

One process at a time: the daemon holds an exclusive ``flock`` on ``DATABASE.lock``.
Every method runs on the daemon's single database thread.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from vmreclaim.core.errors import UsageError, VMReclaimError
from vmreclaim.core.ranges import RangeSet

SCHEMA_VERSION = 1
#: The reclaims table keeps this many recent attempts (an audit trail, not a history).
KEEP_RECLAIMS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    disk TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received REAL NOT NULL,
    bytes INTEGER NOT NULL,
    count INTEGER NOT NULL,
    ranges BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_disk ON records (disk, id);
CREATE TABLE IF NOT EXISTS disks (
    key TEXT PRIMARY KEY,
    received_records INTEGER NOT NULL DEFAULT 0,
    received_bytes INTEGER NOT NULL DEFAULT 0,
    requested_bytes INTEGER NOT NULL DEFAULT 0,
    verified_bytes INTEGER NOT NULL DEFAULT 0,
    punched_bytes INTEGER NOT NULL DEFAULT 0,
    freed_bytes INTEGER NOT NULL DEFAULT 0,
    reclaims INTEGER NOT NULL DEFAULT 0,
    last_reclaim REAL
);
CREATE TABLE IF NOT EXISTS reclaims (
    id INTEGER PRIMARY KEY,
    disk TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    mode TEXT NOT NULL,
    outcome TEXT NOT NULL,
    requested_bytes INTEGER NOT NULL,
    verified_bytes INTEGER NOT NULL,
    punched_bytes INTEGER NOT NULL,
    freed_bytes INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def encode_ranges(ranges: RangeSet) -> bytes:
    """The BLOB form of a range set: (start, end) pairs of little-endian int64."""
    return np.stack((ranges.starts, ranges.ends), axis=1).astype("<i8").tobytes()


def decode_ranges(blob: bytes, where: str) -> RangeSet:
    """A range set back from :func:`encode_ranges`; a damaged BLOB names its record."""
    if len(blob) % 16:
        raise VMReclaimError(f"{where}: ranges BLOB of {len(blob)} bytes is not whole (start, end) pairs")
    pairs = np.frombuffer(blob, dtype="<i8").reshape(-1, 2).astype(np.int64)
    if len(pairs) and (bool((pairs[:, 0] < 0).any()) or bool((pairs[:, 1] < pairs[:, 0]).any())):
        raise VMReclaimError(f"{where}: ranges BLOB holds a negative or reversed range")
    return RangeSet(pairs[:, 0], pairs[:, 1])


@dataclass(frozen=True)
class StoredRecord:
    """One pending record of a disk as the database holds it."""

    id: int
    disk: str
    seq: int
    received: float
    ranges: RangeSet


@dataclass(frozen=True)
class Finish:
    """A successful reclaim: records of ``row.disk`` up to ``upto`` are handled and
    ``remainder`` (if any) is what of them is still pending."""

    row: ReclaimRow
    upto: int
    remainder: StoredRecord | None = None


@dataclass(frozen=True)
class PendingLoad:
    """The pending records of one disk at start-up: ids, receive times, their union."""

    ids: list[int]
    received: list[float]
    ranges: RangeSet


@dataclass
class DiskTotals:
    """What has happened to one disk since it was first seen (the ``disks`` row)."""

    received_records: int = 0
    received_bytes: int = 0
    requested_bytes: int = 0
    verified_bytes: int = 0
    punched_bytes: int = 0
    freed_bytes: int = 0
    reclaims: int = 0
    last_reclaim: float | None = None


@dataclass(frozen=True)
class ReclaimRow:
    """One reclaim attempt, successful or not (the ``reclaims`` row)."""

    disk: str
    started: float
    finished: float
    mode: str
    outcome: str
    requested_bytes: int = 0
    verified_bytes: int = 0
    punched_bytes: int = 0
    freed_bytes: int = 0
    detail: str = ""


class DeletionStore:
    """The daemon's SQLite database; see the module docstring for its tables."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UsageError(f"database {self.path}: cannot create its lock file: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise UsageError(
                f"database {self.path} is in use by another vmreclaim host daemon (it holds {self.path}.lock)"
            ) from None
        try:
            _private(self.path)
        except OSError as exc:
            os.close(self._lock_fd)
            raise UsageError(f"database {self.path}: cannot make it private: {exc.strerror}") from exc
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise UsageError(f"database {self.path}: SQLite refused WAL mode (got {mode!r})")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_SCHEMA)
            self._check_version()
        except sqlite3.DatabaseError as exc:
            os.close(self._lock_fd)
            raise UsageError(f"database {self.path}: {exc}") from exc

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] != str(SCHEMA_VERSION):
            raise UsageError(
                f"database {self.path}: schema version {row[0]}, this vmreclaim reads {SCHEMA_VERSION}"
            )

    # -- reading at start ------------------------------------------------------------------

    def max_record_id(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()
        return int(row[0])

    def pending(self) -> Iterator[StoredRecord]:
        """Every pending record, oldest first."""
        cursor = self._db.execute("SELECT id, disk, seq, received, ranges FROM records ORDER BY id")
        for rid, disk, seq, received, blob in cursor:
            yield StoredRecord(rid, disk, seq, received, decode_ranges(blob, f"{self.path}: record {rid}"))

    def pending_by_disk(self) -> dict[str, PendingLoad]:
        """Every pending record, grouped by disk, decoded in bulk (start-up after a crash
        with a large backlog must not cost one numpy call per record)."""
        rows = self._db.execute("SELECT disk, id, received, ranges FROM records ORDER BY id").fetchall()
        grouped: dict[str, tuple[list[int], list[float], list[bytes]]] = {}
        for disk, rid, received, blob in rows:
            ids, times, blobs = grouped.setdefault(disk, ([], [], []))
            if len(blob) % 16:
                raise VMReclaimError(
                    f"{self.path}: record {rid}: ranges BLOB of {len(blob)} bytes is not whole pairs"
                )
            ids.append(rid)
            times.append(received)
            blobs.append(blob)
        return {
            disk: PendingLoad(ids, times, decode_ranges(b"".join(blobs), f"{self.path}: records of {disk}"))
            for disk, (ids, times, blobs) in grouped.items()
        }

    def totals(self) -> dict[str, DiskTotals]:
        names = [f.name for f in fields(DiskTotals)]
        rows = self._db.execute(f"SELECT key, {', '.join(names)} FROM disks").fetchall()
        return {row[0]: DiskTotals(*row[1:]) for row in rows}

    def rejected(self) -> dict[str, int]:
        """Rejected records per VM, over the database's whole life."""
        rows = self._db.execute("SELECT name, value FROM counters WHERE name LIKE 'rejected:%'")
        return {name.split(":", 1)[1]: int(value) for name, value in rows}

    def policy_state(self, driver: str) -> dict[str, Any] | None:
        """The state the policy ``driver`` last saved, or ``None``."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (f"policy:{driver}",)).fetchone()
        if row is None:
            return None
        try:
            state = json.loads(row[0])
        except json.JSONDecodeError:
            return None
        return state if isinstance(state, dict) else None

    def recent_reclaims(self, disk: str | None = None, limit: int = 20) -> list[ReclaimRow]:
        names = [f.name for f in fields(ReclaimRow)]
        where, args = ("WHERE disk = ?", (disk, limit)) if disk else ("", (limit,))
        rows = self._db.execute(
            f"SELECT {', '.join(names)} FROM reclaims {where} ORDER BY id DESC LIMIT ?", args
        ).fetchall()
        return [ReclaimRow(*row) for row in rows]

    # -- writing --------------------------------------------------------------------------

    def append(self, records: Sequence[StoredRecord], rejected: Mapping[str, int] = {}) -> None:
        """Store ``records`` and count ``rejected`` (per VM) in one durable transaction."""
        self.write(records, rejected)

    def finish(
        self,
        row: ReclaimRow,
        *,
        upto: int,
        remainder: StoredRecord | None,
        policy: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        """A reclaim of ``row.disk`` handled its records up to id ``upto``.

        Deletes them, stores ``remainder`` (what the reclaim did not try) in their
        place, adds the attempt's bytes to the disk's totals and saves the policy state,
        all in one transaction: a crash leaves either the records or the totals.
        """
        self.write(finishes=[Finish(row, upto, remainder)], policy=policy)

    def log_attempt(self, row: ReclaimRow, policy: tuple[str, dict[str, Any]] | None = None) -> None:
        """Record an attempt that changed nothing (refused, postponed, failed)."""
        self.write(attempts=[row], policy=policy)

    def write(
        self,
        records: Sequence[StoredRecord] = (),
        rejected: Mapping[str, int] = {},
        finishes: Sequence[Finish] = (),
        attempts: Sequence[ReclaimRow] = (),
        policy: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        """Everything the daemon has to remember since its last commit, in one durable
        transaction (the committer's group commit)."""
        per_disk: dict[str, list[int]] = {}
        rows = []
        for r in records:
            total = r.ranges.total
            rows.append((r.id, r.disk, r.seq, r.received, total, len(r.ranges), encode_ranges(r.ranges)))
            acc = per_disk.setdefault(r.disk, [0, 0])
            acc[0] += 1
            acc[1] += total
        with self._transaction():
            if rows:
                self._db.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.executemany(
                    "INSERT INTO disks (key, received_records, received_bytes) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET "
                    "received_records = received_records + excluded.received_records, "
                    "received_bytes = received_bytes + excluded.received_bytes",
                    [(k, n, b) for k, (n, b) in per_disk.items()],
                )
            self._count(rejected)
            for f in finishes:
                self._finish(f)
            for row in attempts:
                self._log(row)
            self._save_policy(policy)

    def _finish(self, f: Finish) -> None:
        row = f.row
        self._db.execute("DELETE FROM records WHERE disk = ? AND id <= ?", (row.disk, f.upto))
        if f.remainder is not None and f.remainder.ranges:
            r = f.remainder
            self._db.execute(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                (r.id, r.disk, r.seq, r.received, r.ranges.total, len(r.ranges), encode_ranges(r.ranges)),
            )
        self._db.execute("INSERT INTO disks (key) VALUES (?) ON CONFLICT (key) DO NOTHING", (row.disk,))
        self._db.execute(
            "UPDATE disks SET requested_bytes = requested_bytes + ?, "
            "verified_bytes = verified_bytes + ?, punched_bytes = punched_bytes + ?, "
            "freed_bytes = freed_bytes + ?, reclaims = reclaims + 1, last_reclaim = ? WHERE key = ?",
            (
                row.requested_bytes,
                row.verified_bytes,
                row.punched_bytes,
                row.freed_bytes,
                row.finished,
                row.disk,
            ),
        )
        self._log(row)

    def save_policy(self, driver: str, state: dict[str, Any]) -> None:
        with self._transaction():
            self._save_policy((driver, state))

    def count_rejected(self, rejected: Mapping[str, int]) -> None:
        with self._transaction():
            self._count(rejected)

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            os.close(self._lock_fd)

    # -- helpers ---------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _log(self, row: ReclaimRow) -> None:
        values = asdict(row)
        self._db.execute(
            f"INSERT INTO reclaims ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
            tuple(values.values()),
        )
        self._db.execute(
            "DELETE FROM reclaims WHERE id <= (SELECT MAX(id) FROM reclaims) - ?", (KEEP_RECLAIMS,)
        )

    def _save_policy(self, policy: tuple[str, dict[str, Any]] | None) -> None:
        if policy is not None:
            driver, state = policy
            self._db.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (f"policy:{driver}", json.dumps(state)),
            )

    def _count(self, rejected: Mapping[str, int]) -> None:
        if rejected:
            self._db.executemany(
                "INSERT INTO counters VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                [(f"rejected:{vm}", n) for vm, n in rejected.items() if n],
            )


def _private(path: Path) -> None:
    """Make the database and its -wal and -shm files readable by their owner only.

    The database holds every VM's deletion history and image paths. SQLite creates the
    -wal and -shm files with the database file's own mode, so the database is created
    0600 first (``open``'s mode can only be narrowed by the umask, and changing the
    process-wide umask would race the daemon's other threads); files left readable by an
    older version are tightened.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for suffix in ("", "-wal", "-shm"):
        try:
            st = os.stat(f"{path}{suffix}")
        except FileNotFoundError:
            continue
        if st.st_mode & 0o077:
            os.chmod(f"{path}{suffix}", st.st_mode & 0o700)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
