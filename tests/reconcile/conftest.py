"""Fixtures of the reconciliation tests: the agent tests' loop-mounted filesystems."""

from tests.agent.conftest import guest_kit, loopfs  # noqa: F401 (re-exported fixtures)
