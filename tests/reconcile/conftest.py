"""Fixtures of the reconciliation tests: the agent tests' loop-mounted filesystems, and
the host tests' helpers (``hosttest``: the real agent as a process)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))

from tests.agent.conftest import guest_kit, loopfs  # noqa: F401 (re-exported fixtures)
