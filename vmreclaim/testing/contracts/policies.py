"""The policy contract: what the host daemon relies on from every policy driver.

Subclass :class:`PolicyContract` in a test module as ``Test<Something>`` and set
``driver`` (the entry-point name) and, if the defaults do not validate, ``options``::

    from vmreclaim.testing import PolicyContract

    class TestQuietHours(PolicyContract):
        driver = "quiet-hours"
        options = {"busy_from": 9, "busy_until": 17}

pytest then runs every ``test_*`` method below against that driver, loaded through its
entry point as the daemon loads it.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import pytest

from vmreclaim.core import loader
from vmreclaim.core.policies import Decision, DiskState, Policy, StorageState

GIB = 1 << 30
#: Host storage states the suite asks about: empty, half full, nearly full, zero-sized.
STORAGE = [StorageState(100 * GIB, 100 * GIB), StorageState(100 * GIB, 50 * GIB),
           StorageState(100 * GIB, GIB), StorageState(0, 0)]  # fmt: skip
#: A moment in the middle of a weekday afternoon and one at night (both UTC).
NOWS = [1_700_000_000.0, 1_700_040_000.0]


class PolicyContract:
    """Every policy driver: loads with its options, answers every question with a
    :class:`Decision`, keeps a JSON state it can take back, honours the bound on waiting."""

    #: The driver's entry-point name in ``vmreclaim.policies``.
    driver: ClassVar[str]
    #: Its options as they would appear in the host's YAML (``policy: {driver: ..., <here>}``).
    options: ClassVar[dict[str, Any]] = {}

    def make(self, **overrides: Any) -> Policy:
        cls = loader.driver_class("policies", self.driver)
        opts = cls.Options.model_validate({**self.options, **overrides})
        return loader.load_driver("policies", self.driver, Policy, opts)

    @staticmethod
    def disks() -> list[DiskState]:
        return [
            DiskState("vm/d0", image_size=10 * GIB, pending_bytes=0),
            DiskState("vm/d0", image_size=10 * GIB, pending_bytes=4096, oldest_pending=NOWS[0] - 1),
            DiskState("vm/d0", image_size=10 * GIB, pending_bytes=9 * GIB, last_reclaim=NOWS[0] - 3600),
            DiskState("vm/d0", image_size=0, pending_bytes=1 << 20),
        ]

    def test_is_installed_as_a_policy(self) -> None:
        found = {d.name: d for d in loader.installed("policies")}
        assert self.driver in found, f"no policy entry point {self.driver!r}"
        assert found[self.driver].error is None, found[self.driver].error
        assert issubclass(loader.driver_class("policies", self.driver), Policy)

    def test_unknown_option_is_refused(self) -> None:
        cls = loader.driver_class("policies", self.driver)
        with pytest.raises(ValueError, match="no_such_option"):
            cls.Options.model_validate({**self.options, "no_such_option": 1})

    def test_every_question_gets_a_decision_with_a_reason(self) -> None:
        policy = self.make()
        for disk in self.disks():
            for storage in STORAGE:
                for now in NOWS:
                    decision = policy.decide(disk, storage, now)
                    assert isinstance(decision, Decision)
                    assert isinstance(decision.reclaim, bool)
                    assert isinstance(decision.reason, str) and decision.reason.strip()

    def test_the_same_questions_get_the_same_answers(self) -> None:
        """``decide`` depends on its arguments and its state (which it may adapt), not on
        the clock or the process: two instances asked the same get the same answers."""
        answers = []
        for _ in range(2):
            policy = self.make()
            answers.append([policy.decide(d, s, now) for d in self.disks() for s in STORAGE for now in NOWS])
        assert answers[0] == answers[1]

    def test_state_is_json_and_survives_a_restart(self) -> None:
        policy = self.make()
        for disk in self.disks():
            policy.feedback(disk, 1 << 20, STORAGE[1], NOWS[0])
        state = policy.state()
        assert json.loads(json.dumps(state)) == state
        again = self.make()
        again.restore(json.loads(json.dumps(state)))
        assert again.state() == state
        for disk in self.disks():
            assert again.decide(disk, STORAGE[2], NOWS[1]) == policy.decide(disk, STORAGE[2], NOWS[1])

    def test_feedback_takes_any_outcome(self) -> None:
        policy = self.make()
        for disk in self.disks():
            for freed in (0, 1, 9 * GIB):
                for storage in STORAGE:
                    policy.feedback(disk, freed, storage, NOWS[0])
        for value in policy.state().values():
            assert not (isinstance(value, float) and not math.isfinite(value)), policy.state()

    def test_the_bound_on_waiting_wins_over_the_rule(self) -> None:
        """Pending bytes past ``max_delay_seconds`` are reclaimed whatever ``decide`` says."""
        policy = self.make()
        max_delay = getattr(policy.options, "max_delay_seconds", None)
        if max_delay is None:
            pytest.skip(f"{self.driver}: options do not derive PolicyOptions (no bound on waiting)")
        old = DiskState("vm/d0", image_size=10 * GIB, pending_bytes=4096, oldest_pending=NOWS[0] - max_delay)
        decision = policy.overdue(old, NOWS[0])
        assert decision is not None and decision.reclaim
        assert policy.overdue(DiskState("vm/d0", 10 * GIB, 0, oldest_pending=0.0), NOWS[0]) is None
