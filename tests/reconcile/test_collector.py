"""The host's reassembly of ``free_space`` answers on one connection: hostile sequences
(wrong disk, unasked ids, chunk-count changes, errors) fail the reconciliation whole."""

from __future__ import annotations

import asyncio

import pytest

from vmreclaim.core import freespace
from vmreclaim.core import protocol as p
from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.freespace import FreeSpace, Reconcile
from vmreclaim.core.ranges import RangeSet
from vmreclaim.host.reconcile import FreeSpaceCollector

DISK = 8 << 30


def answer(request: Reconcile, ranges: RangeSet) -> list[FreeSpace]:
    return freespace.messages(request, freespace.encode(ranges))


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_messages_cross_the_protocol_in_both_directions() -> None:
    request = Reconcile(id=3, disk="disk0")
    assert p.decode_from_host(p.encode(request)) == request
    (msg,) = answer(request, RangeSet([4096], [8192]))
    line = p.encode(msg)
    assert p.decode_from_agent(line) == msg
    with pytest.raises(ProtocolError, match="chunk"):
        p.decode_from_agent(line.replace(b'"chunk":0', b'"chunk":"0"'))
    with pytest.raises(ProtocolError):
        p.decode_from_agent(line.replace(b'"chunks":1', b'"chunks":100000'))


def test_a_multi_chunk_answer_is_reassembled() -> None:
    async def go() -> None:
        c = FreeSpaceCollector()
        request, future = c.ask("disk0", DISK)
        assert request is not None
        again, same = c.ask("disk0", DISK)
        assert again is None and same is future, "one open reconciliation per disk"
        n = freespace.MAX_CHUNK_RANGES + 10
        starts = [i * 8192 for i in range(n)]
        ranges = RangeSet(starts, [s + 4096 for s in starts])
        msgs = answer(request, ranges)
        assert len(msgs) == 2
        for m in msgs:
            assert c.received(m) is None
        got = await future
        assert got.free == ranges and not got.partial

    run(go())


@pytest.mark.parametrize(
    "tamper, why",
    [
        (lambda m: m.model_copy(update={"disk": "disk1"}), "names disk"),
        (lambda m: m.model_copy(update={"id": m.id + 1000}), "did not ask"),
        (lambda m: m.model_copy(update={"error": "EIO"}), "could not list"),
        (lambda m: m.model_copy(update={"chunks": 0}), "0 chunks"),
        (lambda m: m.model_copy(update={"bytes": m.bytes + 1}), "cover"),
    ],
)
def test_hostile_answers_fail_the_reconciliation(tamper: object, why: str) -> None:
    async def go() -> None:
        c = FreeSpaceCollector()
        request, future = c.ask("disk0", DISK)
        assert request is not None
        (msg,) = answer(request, RangeSet([4096], [8192]))
        refusal = c.received(tamper(msg))  # type: ignore[operator]
        assert refusal is not None and why in refusal
        if why != "did not ask":
            with pytest.raises(ProtocolError, match=why):
                await future
            assert c.received(msg) is not None, "nothing more is taken for a failed request"

    run(go())


def test_chunk_count_may_not_change_midway() -> None:
    async def go() -> None:
        c = FreeSpaceCollector()
        request, future = c.ask("disk0", DISK)
        assert request is not None
        n = freespace.MAX_CHUNK_RANGES + 10
        starts = [i * 8192 for i in range(n)]
        first, second = answer(request, RangeSet(starts, [s + 4096 for s in starts]))
        assert c.received(first) is None
        assert "says 3 chunks" in (c.received(second.model_copy(update={"chunks": 3})) or "")
        with pytest.raises(ProtocolError):
            await future

    run(go())


def test_past_the_disk_and_close() -> None:
    async def go() -> None:
        c = FreeSpaceCollector()
        request, future = c.ask("disk0", 1 << 20)
        assert request is not None
        (msg,) = answer(request, RangeSet([1 << 20], [2 << 20]))
        assert "past the disk end" in (c.received(msg) or "")
        with pytest.raises(ProtocolError):
            await future
        request, future = c.ask("disk0", 1 << 20)
        c.close("channel closed")
        with pytest.raises(ConnectionError):
            await future

    run(go())
