"""Group commit: records become durable in batches, and only then are acknowledged.

Sessions hand validated records to the :class:`Committer` and go on reading. One
transaction commits at a time on the database thread; everything that arrives while it
runs goes into the next one, so a fleet of agents costs one ``fsync`` per batch rather
than one per record, and a lone agent still gets its ack within one commit's time. Reclaim
outcomes ride in the same transactions. When a commit fails, the batch is retried piece
by piece: a record the database itself refuses is refused alone (its agent gets a
``nack``) and never costs another VM its acknowledgements; when the database is the
problem (a full disk, an I/O error) nothing of the batch is acknowledged (the agents keep
the records in their spools and send them again).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.model import DeletionRecord
from vmreclaim.host.logs import event
from vmreclaim.host.pending import fingerprint
from vmreclaim.host.store import DeletionStore, Finish, ReclaimRow, StoredRecord

#: A batch holds at most this many records (bounded transaction size and latency).
MAX_BATCH_RECORDS = 20_000
#: Sessions stop reading while more ranges than this wait for a commit.
MAX_BACKLOG_RANGES = 4_000_000


@dataclass
class Incoming:
    """A validated record waiting for its commit."""

    key: str
    record: DeletionRecord
    received: float
    #: Called on the event loop with the record's id once committed, or with the error.
    done: Callable[[int | None, BaseException | None], None]
    #: Identical records (same disk, same ranges) that arrived while this one waited for
    #: its commit: they are answered with its outcome and never stored themselves.
    followers: list[Callable[[int | None, BaseException | None], None]] = field(default_factory=list)
    #: :func:`~vmreclaim.host.pending.fingerprint` of the ranges (set by ``submit``).
    print_: bytes = b""

    def complete(self, rid: int | None, error: BaseException | None) -> None:
        self.done(rid, error)
        for done in self.followers:
            done(rid, error)


class Committer:
    """Batches :class:`Incoming` records into durable transactions."""

    def __init__(
        self,
        store: DeletionStore,
        db: Executor,
        on_committed: Callable[[list[tuple[Incoming, int]]], None],
        *,
        first_id: int,
    ) -> None:
        self._store = store
        self._db = db
        self._on_committed = on_committed
        self._queue: list[Incoming] = []
        #: (disk, fingerprint of its ranges) -> the record waiting or being committed.
        self._inflight: dict[tuple[str, bytes], Incoming] = {}
        self._rejected: Counter[str] = Counter()
        self._finishes: list[tuple[Finish, asyncio.Future[None]]] = []
        self._attempts: list[ReclaimRow] = []
        self._policy: tuple[str, dict[str, Any]] | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._backlog = 0
        self._next_id = first_id
        self.commits = 0
        self.last_commit_seconds = 0.0

    def allocate_id(self) -> int:
        """A fresh record id (ids only grow, so ``id <= upto`` means "older")."""
        rid = self._next_id
        self._next_id += 1
        return rid

    def _forget(self, batch: list[Incoming]) -> None:
        """The batch has its outcome: resends from now on are new records."""
        for item in batch:
            if self._inflight.get((item.key, item.print_)) is item:
                del self._inflight[(item.key, item.print_)]

    def submit(self, item: Incoming) -> None:
        item.print_ = fingerprint(item.record.ranges)
        print_ = (item.key, item.print_)
        first = self._inflight.get(print_)
        if first is not None:
            # A resend of a record not committed yet: it gets the first one's answer.
            first.followers.append(item.done)
            return
        self._inflight[print_] = item
        self._queue.append(item)
        self._backlog += len(item.record.ranges)
        if self._backlog > MAX_BACKLOG_RANGES:
            self._room.clear()
        self._idle.clear()
        self._wake.set()

    def count_rejected(self, vm: str) -> None:
        """Persist a rejection with the next batch (rejections need no ack)."""
        self._rejected[vm] += 1
        self._idle.clear()
        self._wake.set()

    async def room(self) -> None:
        """Wait until the backlog is small enough to read more records."""
        await self._room.wait()

    async def drain(self) -> None:
        """Wait until everything submitted so far is committed (or failed)."""
        await self._idle.wait()

    def finish(self, finish: Finish, policy: tuple[str, dict[str, Any]] | None) -> asyncio.Future[None]:
        """Store a reclaim's outcome with the next batch; the future ends with its commit."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._finishes.append((finish, future))
        if policy is not None:
            self._policy = policy
        self._idle.clear()
        self._wake.set()
        return future

    def log_attempt(self, row: ReclaimRow, policy: tuple[str, dict[str, Any]] | None = None) -> None:
        """Store an attempt that changed nothing with the next batch (no one waits)."""
        self._attempts.append(row)
        if policy is not None:
            self._policy = policy
        self._idle.clear()
        self._wake.set()

    def save_policy(self, policy: tuple[str, dict[str, Any]]) -> None:
        """Store the policy's state with the next batch."""
        self._policy = policy
        self._idle.clear()
        self._wake.set()

    def _has_work(self) -> bool:
        return bool(self._queue or self._rejected or self._finishes or self._attempts or self._policy)

    async def _isolate(
        self,
        rows: list[StoredRecord],
        rejected: dict[str, int],
        finishes: list[Finish],
        attempts: list[ReclaimRow],
        policy: tuple[str, dict[str, Any]] | None,
        first: BaseException,
    ) -> dict[int, BaseException]:
        """After a failed group commit: commit the bookkeeping alone, then each record
        alone; return the records the database refused (by id), each as a
        :class:`ProtocolError` its session answers with ``nack``.

        Raises if the failure is the database's rather than a record's (the bookkeeping
        alone fails, or a record meets an ``OperationalError``: a full disk, an I/O
        error), so that nothing of the batch is acknowledged.
        """
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._db, self._store.write, [], rejected, finishes, attempts, policy)
        failed: dict[int, BaseException] = {}
        for row in rows:
            try:
                await loop.run_in_executor(self._db, self._store.write, [row])
            except sqlite3.OperationalError:
                raise
            except Exception as exc:
                failed[row.id] = ProtocolError(f"the deletion database refused it: {exc}"[:512])
        event(
            logging.WARNING,
            "ingest.records_refused",
            records=len(failed),
            of=len(rows),
            disks=sorted({r.disk for r in rows if r.id in failed})[:16],
            error=str(first)[:512],
        )
        return failed

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._has_work():
                batch = self._queue[:MAX_BATCH_RECORDS]
                del self._queue[:MAX_BATCH_RECORDS]
                rejected = dict(self._rejected)
                self._rejected.clear()
                finishes, self._finishes = self._finishes, []
                attempts, self._attempts = self._attempts, []
                policy, self._policy = self._policy, None
                rows = [
                    StoredRecord(self.allocate_id(), i.key, i.record.seq, i.received, i.record.ranges)
                    for i in batch
                ]
                started = time.monotonic()
                done = [f for f, _ in finishes]
                try:
                    try:
                        await loop.run_in_executor(
                            self._db, self._store.write, rows, rejected, done, attempts, policy
                        )
                        failed: dict[int, BaseException] = {}
                    except Exception as exc:
                        # One record may be what the database refuses: find it, so that
                        # it alone is refused and the others of its batch commit.
                        failed = await self._isolate(rows, rejected, done, attempts, policy, exc)
                except Exception as exc:  # a full disk, an I/O error: nothing is acked
                    self._forget(batch)
                    event(logging.ERROR, "ingest.commit_failed", records=len(batch), error=str(exc))
                    for item in batch:
                        item.complete(None, exc)
                    for _, future in finishes:
                        if not future.done():
                            future.set_exception(exc)
                    self._rejected.update(rejected)
                    await asyncio.sleep(0.5)
                else:
                    self._forget(batch)
                    self.commits += 1
                    self.last_commit_seconds = time.monotonic() - started
                    committed = [
                        (item, row.id) for item, row in zip(batch, rows, strict=True) if row.id not in failed
                    ]
                    if committed:
                        self._on_committed(committed)
                    for item, row in zip(batch, rows, strict=True):
                        if row.id in failed:
                            item.complete(None, failed[row.id])
                        else:
                            item.complete(row.id, None)
                    for _, future in finishes:
                        if not future.done():
                            future.set_result(None)
                finally:
                    self._backlog -= sum(len(i.record.ranges) for i in batch)
                    if self._backlog <= MAX_BACKLOG_RANGES // 2:
                        self._room.set()
            self._idle.set()
