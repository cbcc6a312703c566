"""Every built-in policy driver passes the policy contract (vmreclaim.testing)."""

from __future__ import annotations

from vmreclaim.core import loader
from vmreclaim.testing import PolicyContract


def test_every_installed_builtin_policy_is_under_contract() -> None:
    builtin = {d.name for d in loader.installed("policies") if d.distribution == "vmreclaim"}
    assert builtin == {"always", "threshold", "watermark"}


class TestAlways(PolicyContract):
    driver = "always"


class TestThreshold(PolicyContract):
    driver = "threshold"


class TestWatermark(PolicyContract):
    driver = "watermark"
