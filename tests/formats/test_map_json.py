"""``ExtentMap.write_json`` (the vectorised writer behind ``image map --json``) prints
exactly the document ``to_json`` describes, for any map."""

from __future__ import annotations

import io
import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from vmreclaim.core.extents import NO_OFFSET, ExtentKind, ExtentMap

values = st.one_of(st.integers(0, 2**63 - 2), st.sampled_from([0, 1, 9, 10, 99, 100, 65536, 10**18]))


@given(
    rows=st.lists(
        st.tuples(values, values, st.sampled_from(list(ExtentKind)), st.one_of(st.just(NO_OFFSET), values)),
        max_size=80,
    ),
    chunk=st.sampled_from([1, 3, 1 << 15]),
)
def test_write_json_is_to_json(rows: list[tuple[int, int, ExtentKind, int]], chunk: int) -> None:
    import vmreclaim.core.extents as extents

    m = ExtentMap(
        np.array([r[0] for r in rows], dtype=np.int64),
        np.array([r[1] for r in rows], dtype=np.int64),
        np.array([r[2] for r in rows], dtype=np.uint8),
        np.array([r[3] for r in rows], dtype=np.int64),
    )
    old, extents._JSON_CHUNK = extents._JSON_CHUNK, chunk  # several chunks, several threads
    try:
        out = io.StringIO()
        m.write_json(out)
    finally:
        extents._JSON_CHUNK = old
    assert json.loads(out.getvalue()) == m.to_json()
    assert out.getvalue().endswith("]\n")
