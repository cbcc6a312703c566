"""The deletion database: WAL, durable appends, reclaims that replace records, one owner."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from vmreclaim.core.errors import UsageError, VMReclaimError
from vmreclaim.core.ranges import RangeSet
from vmreclaim.host.store import DeletionStore, ReclaimRow, StoredRecord, decode_ranges, encode_ranges


def rec(rid: int, disk: str, pairs: list[tuple[int, int]], received: float = 1.0) -> StoredRecord:
    return StoredRecord(rid, disk, rid, received, RangeSet.from_ranges(pairs))


def test_wal_mode_and_synchronous_full(tmp_path: Path) -> None:
    store = DeletionStore(tmp_path / "d.sqlite")
    try:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()


def test_appended_records_are_visible_to_another_connection_at_once(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite"
    store = DeletionStore(path)
    try:
        store.append(
            [rec(1, "vm1/disk0", [(0, 4096), (8192, 4096)]), rec(2, "vm2/disk0", [(0, 512)])], {"vm3": 2}
        )
        other = sqlite3.connect(path)
        rows = other.execute("SELECT id, disk, bytes, count FROM records ORDER BY id").fetchall()
        assert rows == [(1, "vm1/disk0", 8192, 2), (2, "vm2/disk0", 512, 1)]
        other.close()
        assert store.rejected() == {"vm3": 2}
        assert store.totals()["vm1/disk0"].received_bytes == 8192
        assert store.max_record_id() == 2
    finally:
        store.close()


def test_pending_round_trip_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite"
    store = DeletionStore(path)
    store.append([rec(5, "vm1/disk0", [(4096, 4096)], received=123.5)])
    store.close()
    store = DeletionStore(path)
    try:
        (only,) = list(store.pending())
        assert (only.id, only.disk, only.received) == (5, "vm1/disk0", 123.5)
        assert only.ranges == RangeSet.from_ranges([(4096, 4096)])
    finally:
        store.close()


def test_finish_replaces_handled_records_with_the_remainder(tmp_path: Path) -> None:
    store = DeletionStore(tmp_path / "d.sqlite")
    try:
        store.append([rec(1, "a/d", [(0, 100)]), rec(2, "a/d", [(200, 100)]), rec(3, "b/d", [(0, 10)])])
        store.append([rec(4, "a/d", [(500, 100)])])  # arrived during the reclaim
        row = ReclaimRow("a/d", 10.0, 11.0, "fence", "done", 200, 150, 4096, 4096, "ok")
        store.finish(
            row, upto=2, remainder=rec(5, "a/d", [(250, 50)]), policy=("threshold", {"threshold": 0.25})
        )
        left = {(r.id, r.disk): r.ranges.to_pairs() for r in store.pending()}
        assert left == {(3, "b/d"): [[0, 10]], (4, "a/d"): [[500, 100]], (5, "a/d"): [[250, 50]]}
        totals = store.totals()["a/d"]
        assert (totals.requested_bytes, totals.verified_bytes, totals.punched_bytes, totals.freed_bytes) == (
            200,
            150,
            4096,
            4096,
        )
        assert totals.reclaims == 1 and totals.last_reclaim == 11.0
        assert store.policy_state("threshold") == {"threshold": 0.25}
        assert store.recent_reclaims("a/d")[0].detail == "ok"
    finally:
        store.close()


def test_a_failed_attempt_keeps_every_record(tmp_path: Path) -> None:
    store = DeletionStore(tmp_path / "d.sqlite")
    try:
        store.append([rec(1, "a/d", [(0, 100)])])
        store.log_attempt(ReclaimRow("a/d", 1.0, 2.0, "fence", "refused", 100, detail="agent refused"))
        assert [r.id for r in store.pending()] == [1]
        assert store.totals()["a/d"].reclaims == 0
        assert store.recent_reclaims()[0].outcome == "refused"
    finally:
        store.close()


def test_a_second_daemon_cannot_open_the_same_database(tmp_path: Path) -> None:
    store = DeletionStore(tmp_path / "d.sqlite")
    try:
        with pytest.raises(UsageError, match="in use by another vmreclaim host"):
            DeletionStore(tmp_path / "d.sqlite")
    finally:
        store.close()
    DeletionStore(tmp_path / "d.sqlite").close()  # free again once closed


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite"
    DeletionStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(UsageError, match="schema version 99"):
        DeletionStore(path)


def test_not_a_database_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match=str(path)):
        DeletionStore(path)


def test_ranges_blob_round_trip_and_damage() -> None:
    ranges = RangeSet.from_ranges([(0, 1), (10, 5), (2**40, 2**20)])
    assert decode_ranges(encode_ranges(ranges), "x") == ranges
    with pytest.raises(VMReclaimError, match="record 7: ranges BLOB of 17 bytes"):
        decode_ranges(b"\0" * 17, "record 7")
    bad = (10).to_bytes(8, "little") + (5).to_bytes(8, "little")  # end before start
    with pytest.raises(VMReclaimError, match="reversed"):
        decode_ranges(bad, "record 8")


def _modes(path: Path) -> dict[str, int]:
    return {
        suffix: os.stat(f"{path}{suffix}").st_mode & 0o777
        for suffix in ("", "-wal", "-shm", ".lock")
        if os.path.exists(f"{path}{suffix}")
    }


def test_a_new_database_and_its_wal_and_shm_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    """Deletion history and image paths are nobody else's business (issue 11 item 9)."""
    path = tmp_path / "d.sqlite"
    old = os.umask(0o022)
    try:
        store = DeletionStore(path)
        store.append([rec(1, "vm1/disk0", [(0, 4096)])])
        modes = _modes(path)
        store.close()
    finally:
        os.umask(old)
    assert set(modes) >= {"", "-wal", "-shm"}
    assert modes == dict.fromkeys(modes, 0o600)


def test_an_existing_readable_database_is_made_0600(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite"
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t (x)")
    for suffix in ("", "-wal", "-shm"):
        os.chmod(f"{path}{suffix}", 0o644)
    store = DeletionStore(path)
    try:
        modes = _modes(path)
    finally:
        store.close()
        con.close()
    assert modes == dict.fromkeys(modes, 0o600)
