"""The guest↔host wire protocol: versioned JSON lines (docs/protocol.md).

Both ends validate every line they receive with these models; a line that does not
validate is a :class:`~vmreclaim.core.errors.ProtocolError` naming the problem, answered
with an ``error`` message and never acted on. Lines are bounded by
:data:`~vmreclaim.core.transports.MAX_LINE_BYTES`.

The agent and the host never import each other; this module is what they share.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from vmreclaim.core.errors import ProtocolError
from vmreclaim.core.freespace import FreeSpace as FreeSpace
from vmreclaim.core.freespace import Reconcile as Reconcile
from vmreclaim.core.model import MAX_RANGES_PER_RECORD, RECORD_VERSION
from vmreclaim.core.ranges import MAX_OFFSET, RangeSet
from vmreclaim.core.transports import MAX_LINE_BYTES

#: The highest protocol version this code speaks; ``hello`` and ``welcome`` carry it.
#: Version 2 adds reconciliation (``reconcile`` / ``free_space``); both ends still speak 1.
PROTOCOL_VERSION = 2
#: The lowest version still spoken.
MIN_PROTOCOL_VERSION = 1
#: The first version with ``reconcile`` and ``free_space``.
RECONCILE_VERSION = 2

#: Every integer on the wire fits a signed 64-bit SQLite INTEGER (and numpy ``int64``):
#: a number the database cannot take is refused here, never at commit time, where it
#: would fail the other VMs' records of the same group commit (issue 11 item 3).
MAX_WIRE_INT = 2**63 - 1
#: A non-negative wire integer.
WireInt = Annotated[int, Field(ge=0, le=MAX_WIRE_INT)]

RangePairs = list[tuple[int, int]]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_pairs(pairs: RangePairs) -> RangePairs:
    if len(pairs) > MAX_RANGES_PER_RECORD:
        raise ValueError(f"{len(pairs)} ranges, more than the limit {MAX_RANGES_PER_RECORD}")
    for i, (start, length) in enumerate(pairs):
        if start < 0 or length <= 0 or start + length > MAX_OFFSET:
            raise ValueError(f"range #{i} [{start}, {length}] is empty, negative or overflows")
    return pairs


def pairs_to_ranges(pairs: RangePairs) -> RangeSet:
    # In bulk: fences carry up to 65,536 ranges and both ends convert every one.
    if not pairs:
        return RangeSet()
    table = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return RangeSet.from_arrays(table[:, 0], table[:, 1])


def ranges_to_pairs(ranges: RangeSet) -> RangePairs:
    table = np.stack((ranges.starts, ranges.lengths), axis=1).tolist()
    return [(s, n) for s, n in table]


# -- agent → host ---------------------------------------------------------------------------


class HelloDisk(_Message):
    """One virtual disk the agent reports on, with what it knows of its filesystems."""

    id: str = Field(min_length=1, max_length=256)
    mounts: list[str] = Field(default_factory=list, max_length=64)
    fs: str = Field(default="", max_length=64)
    #: The guest block device says it can discard (``discard_max_bytes > 0``).
    discard: bool = False
    #: The disk's size in bytes as the guest sees it (0: unknown). A host refuses records
    #: for a disk whose size is not its image's virtual size: the names do not match.
    size: WireInt = 0
    #: ``"getfsmap"``: records are verified with GETFSMAP; ``"fitrim-only"``: no
    #: GETFSMAP on this filesystem, so no records, only FITRIM after deletions.
    verify: Literal["getfsmap", "fitrim-only"] = "getfsmap"


class Hello(_Message):
    """First line from the agent after connecting."""

    type: Literal["hello"] = "hello"
    v: WireInt
    agent: str = Field(max_length=128)
    #: What this agent can do: ``"fence"`` (FIFREEZE + re-verify), ``"trim"`` (FITRIM).
    capabilities: list[str] = Field(default_factory=list, max_length=32)
    disks: list[HelloDisk] = Field(default_factory=list, max_length=256)


class RecordMessage(_Message):
    """One deletion record; the host answers ``ack`` once it is durable, or ``nack``."""

    type: Literal["record"] = "record"
    #: The record document of DESIGN.md section 5 (validated by ``DeletionRecord.from_json``
    #: on the host, which also replaces its ``vm`` with the channel's VM).
    record: dict[str, Any]


class FenceReady(_Message):
    """The filesystems on the disk are frozen; ``ranges`` are still free under the freeze."""

    type: Literal["fence_ready"] = "fence_ready"
    fence: WireInt
    disk: str
    ranges: RangePairs
    #: How long the agent keeps the freeze, counted from when it received ``fence``.
    lease_ms: WireInt

    _v = field_validator("ranges")(_check_pairs)


class FenceRefused(_Message):
    """The agent could not (or would not) fence; nothing is frozen."""

    type: Literal["fence_refused"] = "fence_refused"
    fence: WireInt
    error: str = Field(max_length=1024)


class Released(_Message):
    """The fence is over: filesystems thawed (also sent when the lease ran out)."""

    type: Literal["released"] = "released"
    fence: WireInt
    #: ``"release"`` (the host asked), ``"lease"`` (the lease ran out), ``"error"``.
    why: str = Field(default="release", max_length=64)


class TrimDone(_Message):
    """Guest-trim mode: the agent ran FITRIM on the asked ranges."""

    type: Literal["trim_done"] = "trim_done"
    fence: WireInt
    trimmed_bytes: WireInt
    #: Set when some FITRIM failed (``EOPNOTSUPP``: the disk passes no discards; an
    #: unknown disk); ``trimmed_bytes`` counts what succeeded.
    error: str | None = Field(default=None, max_length=1024)


class Pong(_Message):
    type: Literal["pong"] = "pong"
    nonce: WireInt = 0


# -- host → agent ---------------------------------------------------------------------------


class WelcomeDisk(_Message):
    id: str
    size: WireInt
    #: ``"fence"``: the host punches inside a fence; ``"trim"``: the agent runs FITRIM.
    mode: Literal["fence", "trim"] = "fence"


class Welcome(_Message):
    """The host's answer to ``hello``: which VM it takes the agent for, and its disks."""

    type: Literal["welcome"] = "welcome"
    v: WireInt
    vm: str
    disks: list[WelcomeDisk] = Field(default_factory=list)


class Ack(_Message):
    """The record with this ``seq`` is durable in the deletion database."""

    type: Literal["ack"] = "ack"
    seq: WireInt


class Nack(_Message):
    """The record with this ``seq`` was refused; the agent drops it (it would never pass)."""

    type: Literal["nack"] = "nack"
    seq: WireInt
    error: str = Field(max_length=1024)


class Fence(_Message):
    """Freeze the filesystems on ``disk``, re-verify ``ranges`` (virtual-disk bytes), answer
    ``fence_ready`` with the subset still free, and thaw on ``release`` or after the lease."""

    type: Literal["fence"] = "fence"
    fence: WireInt
    disk: str
    ranges: RangePairs
    lease_ms: int = Field(ge=1, le=60_000)

    _v = field_validator("ranges")(_check_pairs)


class Release(_Message):
    type: Literal["release"] = "release"
    fence: WireInt


class Trim(_Message):
    """Guest-trim mode: run FITRIM on exactly ``ranges`` (virtual-disk bytes) of ``disk``."""

    type: Literal["trim"] = "trim"
    fence: WireInt
    disk: str
    ranges: RangePairs

    _v = field_validator("ranges")(_check_pairs)


class Ping(_Message):
    type: Literal["ping"] = "ping"
    nonce: WireInt = 0


# -- both directions ------------------------------------------------------------------------


class Error(_Message):
    """The peer's last line was refused; ``ref`` echoes its type or id when known."""

    type: Literal["error"] = "error"
    error: str = Field(max_length=4096)
    ref: str | None = Field(default=None, max_length=256)


AgentMessage = Annotated[
    Hello | RecordMessage | FenceReady | FenceRefused | Released | TrimDone | Pong | FreeSpace | Error,
    Field(discriminator="type"),
]
HostMessage = Annotated[
    Welcome | Ack | Nack | Fence | Release | Trim | Ping | Reconcile | Error, Field(discriminator="type")
]

_AGENT: TypeAdapter[Any] = TypeAdapter(AgentMessage)
_HOST: TypeAdapter[Any] = TypeAdapter(HostMessage)


def encode(message: BaseModel) -> bytes:
    """One JSON line."""
    return message.model_dump_json().encode() + b"\n"


def _no_constant(name: str) -> Any:
    # Python's json takes NaN and Infinity; JSON (RFC 8259) has no such numbers.
    raise ValueError(f"{name} is not a JSON number")


def _parse(line: bytes, sender: str) -> Any:
    """``json.loads`` with every way it can fail on hostile bytes turned into a
    :class:`ProtocolError`: invalid UTF-8, NaN/Infinity, an integer of more than 4,300
    digits (``ValueError``), nesting deeper than the interpreter's recursion limit
    (``RecursionError``)."""
    try:
        return json.loads(line, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"{sender} line is not JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise ProtocolError(f"{sender} line is nested too deeply to be a protocol message") from None


def _decode(line: bytes, adapter: TypeAdapter[Any], sender: str) -> Any:
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"{sender} line of {len(line)} bytes exceeds {MAX_LINE_BYTES}")
    doc = _parse(line, sender)
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise ProtocolError(f"{sender} line is not a JSON object with a 'type'")
    try:
        # Strict: a string or a bool is never taken for a number ("1" is not fence 1).
        return adapter.validate_json(line, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "union_tag_invalid":
            expected = first.get("ctx", {}).get("expected_tags", "")
            raise ProtocolError(
                f"{sender} message type {str(doc['type'])[:64]!r} is unknown (expected {expected})"
            ) from None
        where = ".".join(str(p) for p in first["loc"][1:])  # loc[0] is the tag itself
        raise ProtocolError(
            f"{sender} {str(doc['type'])[:64]!r} message: {where[:200] or '(message)'}: {first['msg']}"
        ) from None


# -- the record document ----------------------------------------------------------------------

#: The keys of a record document (DESIGN.md section 5); any other key is refused.
RECORD_KEYS = frozenset({"v", "vm", "disk", "ranges", "bytes", "fs", "seq"})
_RECORD_INTS = ("v", "bytes", "seq")
_RECORD_STRS = {"vm": 256, "disk": 256, "fs": 64}


def record_seq(doc: dict[str, Any]) -> int | None:
    """The record's ``seq`` if it can be echoed in a ``nack`` (a wire integer), else None."""
    seq = doc.get("seq", 0)
    return seq if type(seq) is int and 0 <= seq <= MAX_WIRE_INT else None


def check_record_document(doc: dict[str, Any]) -> None:
    """Refuse a record document that is not strictly what docs/protocol.md describes.

    The record travels as a free-form object inside ``record`` (so that the host can
    answer ``nack`` with its ``seq`` rather than a bare ``error``); this applies the same
    strictness as the typed messages: no unknown key, integers that are JSON integers
    (``true`` and ``1.0`` are not ``1``) within a signed 64-bit range, bounded strings.
    The ranges themselves are checked by ``DeletionRecord.from_json``.
    """
    unknown = sorted(set(doc) - RECORD_KEYS)
    if unknown:
        raise ProtocolError(f"record has unknown key(s) {', '.join(repr(k[:64]) for k in unknown[:8])}")
    for key in _RECORD_INTS:
        if key in doc and not (key == "bytes" and doc[key] is None):  # null: not claimed
            value = doc[key]
            if type(value) is not int:
                raise ProtocolError(f"record {key!r} must be an integer, not {type(value).__name__}")
            if not 0 <= value <= MAX_WIRE_INT:
                raise ProtocolError(f"record {key!r} is outside [0, 2**63 - 1]")
    if doc.get("v", RECORD_VERSION) != RECORD_VERSION:
        raise ProtocolError(f"record version {doc['v']} is not {RECORD_VERSION}")
    for key, limit in _RECORD_STRS.items():
        if key in doc and (not isinstance(doc[key], str) or len(doc[key]) > limit):
            raise ProtocolError(f"record {key!r} must be a string of at most {limit} characters")


def decode_from_agent(line: bytes) -> Any:
    """Validate a line the host received from an agent."""
    return _decode(line, _AGENT, "agent")


def decode_from_host(line: bytes) -> Any:
    """Validate a line the agent received from the host."""
    return _decode(line, _HOST, "host")
