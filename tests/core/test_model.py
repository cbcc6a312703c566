"""Untrusted input from guests: records and protocol lines are bounded and validated."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmreclaim.core import protocol
from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.model import MAX_RANGES_PER_RECORD, DeletionRecord
from vmreclaim.core.transports import MAX_LINE_BYTES
from vmreclaim.testing import make_record


def test_record_round_trip_and_vm_comes_from_the_caller() -> None:
    record = make_record([(4096, 4096), (0, 4096), (65536, 512)], vm="vm1", seq=7)
    doc = record.to_json()
    assert doc["ranges"] == [[0, 8192], [65536, 512]] and doc["bytes"] == 8704
    doc["vm"] = "someone-else"
    parsed = DeletionRecord.from_json(doc, vm="vm1", disk_size=1 << 20)
    assert parsed.vm == "vm1" and parsed.ranges == record.ranges and parsed.seq == 7


@pytest.mark.parametrize(
    "patch,problem",
    [
        ({"ranges": []}, "non-empty list"),
        ({"ranges": [[0, 0]]}, "empty"),
        ({"ranges": [[-1, 10]]}, "negative"),
        ({"ranges": [[0, 2**63]]}, "overflows"),
        ({"ranges": [[0, 1.5]]}, "two integers"),
        ({"ranges": [[0, True]]}, "two integers"),
        ({"ranges": [[0]]}, "two integers"),
        ({"ranges": [[1 << 20, 1]]}, "outside disk"),
        ({"ranges": [[0, 4096]], "bytes": 4095}, "'bytes'"),
        ({"disk": ""}, "'disk'"),
        ({"disk": "x" * 300}, "'disk'"),
        ({"v": 2}, "version"),
        ({"seq": -1}, "'seq'"),
        ({"fs": 5}, "'fs'"),
    ],
)
def test_bad_records_name_the_problem(patch: dict[str, Any], problem: str) -> None:
    doc: dict[str, Any] = {"v": 1, "vm": "vm1", "disk": "disk0", "ranges": [[0, 4096]], "seq": 1}
    doc.update(patch)
    with pytest.raises(ProtocolError, match=problem):
        DeletionRecord.from_json(doc, vm="vm1", disk_size=1 << 20)


def test_too_many_ranges_are_refused_before_parsing_them() -> None:
    doc = {"disk": "d", "ranges": [[i * 2, 1] for i in range(MAX_RANGES_PER_RECORD + 1)]}
    with pytest.raises(ProtocolError, match="more than the limit"):
        DeletionRecord.from_json(doc)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.dictionaries(st.sampled_from(["v", "vm", "disk", "ranges", "bytes", "fs", "seq", "x"]), json_values)
)
def test_any_json_is_a_record_or_a_protocol_error(doc: dict[str, Any]) -> None:
    try:
        record = DeletionRecord.from_json(doc, vm="vm1", disk_size=1 << 30)
    except ProtocolError:
        return
    assert record.ranges and record.ranges.bounds.end <= 1 << 30


@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_line_decodes_or_raises_protocol_error(line: bytes) -> None:
    for decode in (protocol.decode_from_agent, protocol.decode_from_host):
        with contextlib.suppress(ProtocolError):
            decode(line)


def test_protocol_round_trip_and_bounds() -> None:
    fence = protocol.Fence(fence=3, disk="disk0", ranges=[(0, 4096)], lease_ms=2000)
    assert protocol.decode_from_host(protocol.encode(fence)) == fence
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode_from_agent(b" " * (MAX_LINE_BYTES + 1))
    with pytest.raises(ProtocolError, match="lease_ms"):
        protocol.decode_from_host(b'{"type":"fence","fence":1,"disk":"d","ranges":[[0,1]],"lease_ms":0}')
    with pytest.raises(ProtocolError, match="not JSON"):
        protocol.decode_from_agent(b"{nope")
    with pytest.raises(ProtocolError, match="'type'"):
        protocol.decode_from_agent(b"[1, 2]")
    # An agent cannot send a host message type.
    with pytest.raises(ProtocolError):
        protocol.decode_from_agent(protocol.encode(fence))
