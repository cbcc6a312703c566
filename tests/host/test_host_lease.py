"""The lease of a live punch: nothing is punched once it is over or revoked."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vmreclaim.core.errors import FenceError
from vmreclaim.core.lease import Lease
from vmreclaim.core.opening import open_image
from vmreclaim.core.pipeline import Pipeline
from vmreclaim.core.punch import allocated_bytes, punch_holes
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing import make_disk, make_raw_image

MiB = 1024 * 1024


def _image(tmp_path: Path) -> Path:
    return make_raw_image(tmp_path / "d.raw", 8 * MiB, [(0, 8 * MiB)])


def test_lease_counts_from_send_time_minus_margin() -> None:
    sent = time.monotonic()
    lease = Lease.starting(sent, 5.0, 0.5)
    assert lease.deadline == pytest.approx(sent + 4.5)
    assert 4.0 < lease.remaining() <= 4.5
    lease.check()


def test_expired_lease_stops_before_the_first_write(tmp_path: Path) -> None:
    image = _image(tmp_path)
    fd = os.open(image, os.O_RDWR)
    try:
        before = allocated_bytes(fd)
        with pytest.raises(FenceError, match="lease ended"):
            punch_holes(fd, RangeSet([0], [MiB]), lease=Lease(time.monotonic() - 0.001))
        assert allocated_bytes(fd) == before
    finally:
        os.close(fd)


def test_revoked_lease_names_the_reason(tmp_path: Path) -> None:
    image = _image(tmp_path)
    lease = Lease(time.monotonic() + 60)
    lease.revoke("agent channel closed")
    assert lease.remaining() == 0.0
    fd = os.open(image, os.O_RDWR)
    try:
        with pytest.raises(FenceError, match="agent channel closed"):
            punch_holes(fd, RangeSet([0], [MiB]), lease=lease)
    finally:
        os.close(fd)


def test_pipeline_refuses_after_translate_when_lease_is_over(tmp_path: Path) -> None:
    image_path = _image(tmp_path)
    fd = os.open(image_path, os.O_RDWR)
    try:
        with open_image(image_path) as image:
            with pytest.raises(FenceError):
                Pipeline().reclaim(
                    make_disk(image_path),
                    image,
                    RangeSet([0], [MiB]),
                    fd=fd,
                    lease=Lease(time.monotonic() - 1),
                )
            assert allocated_bytes(fd) == 8 * MiB
            report = Pipeline().reclaim(
                make_disk(image_path),
                image,
                RangeSet([0], [MiB]),
                fd=fd,
                lease=Lease(time.monotonic() + 30),
            )
        assert report.punched_bytes == MiB
        assert allocated_bytes(fd) == 7 * MiB
    finally:
        os.close(fd)
