"""The quiet-hours policy passes the same contract as vmreclaim's own policies.

Run with ``pytest`` once this package and vmreclaim are installed: the suite comes from
``vmreclaim.testing`` and loads the driver through its entry point, as the host does.
"""

from typing import Any, ClassVar

from vmreclaim.testing import PolicyContract


class TestQuietHours(PolicyContract):
    driver = "quiet-hours"
    options: ClassVar[dict[str, Any]] = {"busy_from": 9, "busy_until": 17}
