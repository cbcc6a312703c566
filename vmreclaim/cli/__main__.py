"""``python -m vmreclaim.cli``: the same as the ``vmreclaim`` script."""

from vmreclaim.cli.main import run

run()
