"""Workflows: load -> apply -> measure -> record, each a recorded run emitting progress events.

Front ends (CLI, TUI, server, agents) call these; they never record runs themselves.
"""

from openpto.pipeline.common import Workflow, open_run

__all__ = ["Workflow", "open_run"]
