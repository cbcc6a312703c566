"""The rbd driver's pure parts, without a cluster: names and the discard units."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmreclaim.core.errors import UsageError
from vmreclaim.core.ranges import RangeSet
from vmreclaim.plugins.formats.rbd import RbdFile, RbdName


def test_names_parse_like_qemu() -> None:
    assert RbdName.parse("rbd:pool/img") == RbdName("pool", "img")
    assert RbdName.parse("rbd:p/i@s1:conf=/etc/ceph/ceph.conf:id=admin") == RbdName(
        "p", "i", "s1", "/etc/ceph/ceph.conf", "admin"
    )
    assert str(RbdName.parse("rbd:p/i@s:conf=/x")) == "rbd:p/i@s"


@pytest.mark.parametrize(
    "name",
    [
        "rbd:pool",  # no image
        "rbd:/img",
        "rbd:p/i/j",  # namespaces are not supported
        "rbd:p/i@",
        "rbd:p/i:mon_host=10.0.0.1",  # would point us at another cluster
        "rbd:p/i:keyring=/root/x",
        "rbd:p/i:conf=",
        "rbd:p/i:id=a:id=b",
        "rbd:p/i\\:x",
        "rbd:p/i j",
        "qcow2:p/i",
    ],
)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError):
        RbdName.parse(name)


def _file(object_size: int, size: int) -> RbdFile:
    f = RbdFile.__new__(RbdFile)  # no cluster: only the unit arithmetic is used
    f.object_size, f.size = object_size, size
    return f


@given(
    order=st.integers(12, 22),
    objects=st.integers(1, 64),
    tail=st.integers(0, 4095),
    pieces=st.lists(st.tuples(st.integers(0, 1 << 28), st.integers(1, 1 << 24)), max_size=20),
)
def test_discard_units_are_whole_objects_or_tails_inside_the_request(
    order: int, objects: int, tail: int, pieces: list[tuple[int, int]]
) -> None:
    obj = 1 << order
    size = objects * obj - (tail if tail < obj else 0)
    starts = [min(s % size, size - 1) for s, _ in pieces]
    ranges = RangeSet(starts, [min(s + n, size) for s, n in zip(starts, (n for _, n in pieces), strict=True)])
    out = _file(obj, size).punchable(ranges, obj)
    assert out.subtract(ranges).total == 0  # never a byte outside the request
    for r in out:
        # each piece ends on an object boundary (or the image's end) and starts on one
        # unless it is a tail: from inside an object to that object's end
        assert r.end % obj == 0 or r.end == size
        assert r.start % obj == 0 or (r.start // obj + 1) * obj <= r.end or r.end == size
    # every whole object inside the request is discarded
    whole = ranges.align_inward(obj)
    assert whole.subtract(out).total == 0
