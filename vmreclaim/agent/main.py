"""``vmreclaim agent --config FILE``: set up logging and run the agent until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from vmreclaim.agent import logs
from vmreclaim.agent.runtime import Agent
from vmreclaim.core.config import AgentConfig


def run_agent(config: AgentConfig) -> int:
    """Run the guest agent; the exit code (0 after SIGTERM/SIGINT, 2 when it cannot start).

    Setup errors raise :class:`~vmreclaim.core.errors.UsageError` subclasses that the CLI
    prints as one line.
    """
    # A module imported for the first time during a fence would write its bytecode cache
    # to a possibly frozen filesystem and block: never write bytecode.
    sys.dont_write_bytecode = True
    handler = logs.setup(config.log_level)
    agent = Agent(config, logs=handler)
    return asyncio.run(agent.run())
