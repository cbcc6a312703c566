"""``python -m vmreclaim``: the same as the ``vmreclaim`` console script."""

from vmreclaim.cli import run

run()
