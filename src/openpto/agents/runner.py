"""Run the ``opt agent`` agent in-process: the programmatic async interface.

Front ends (the ``opt agent`` CLI, the TUI) call::

    from openpto.agents.runner import AgentSettings, run_agent

    result = await run_agent(
        "Which artifacts do I have?",
        AgentSettings(session="work", yes=False),
        confirm=ask_user,      # async (tool_name, arguments) -> bool
        on_event=show,         # (AgentEvent) -> None, called as things happen
    )
    print(result.output, result.run_id)

``AgentSettings``
    ``base_url``/``model``: the OpenAI-compatible endpoint and model name; None takes
    ``OPENAI_BASE_URL`` (with ``OPENAI_API_KEY``) when set, otherwise an ``opt serve`` of the
    default model started in-process on a free loopback port. ``session``: a conversation name
    to resume or start (stored in ``opt.db`` through the SDK's SQLite session); None starts a
    fresh one with a generated name. ``yes``: run tools that write or take long without asking.
    ``max_turns``: the most model turns in one run. ``trace``: send the SDK's trace to OpenAI,
    honoured only when the endpoint is api.openai.com. ``db_path``: the database (None: the
    usual ``opt.db``).

Events, passed to ``on_event`` on the event loop's thread as they happen:
    ``TextDelta(text)`` — a piece of the model's reply text;
    ``ToolCalled(call_id, name, arguments)`` — the model called a tool (arguments parsed);
    ``ToolFinished(call_id, name, output, ok)`` — the tool's result text, ``ok`` False when it
    failed or was refused.

``confirm(name, arguments)`` is awaited before a tool that writes or takes long (quantize,
sparsify, export, bench) unless ``settings.yes``; False runs nothing and tells the model so.

``AgentResult(output, tool_calls, session, run_id)``: the final text, the tool calls made (each
``name``, ``arguments``, ``ok``), the conversation's name and the ``runs`` row's id.

The API key is read from the environment only (``OPENAI_API_KEY``) and never stored, logged,
printed or traced.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AgentSettings:
    base_url: str | None = None
    model: str | None = None
    session: str | None = None
    yes: bool = False
    max_turns: int = 10
    trace: bool = False
    db_path: Path | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCalled:
    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolFinished:
    call_id: str
    name: str
    output: str
    ok: bool


AgentEvent = TextDelta | ToolCalled | ToolFinished

Confirm = Callable[[str, dict[str, Any]], Awaitable[bool]]


@dataclass(frozen=True)
class AgentResult:
    output: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    session: str = ""
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "tool_calls": self.tool_calls,
                "session": self.session, "run_id": self.run_id}


async def run_agent(prompt: str, settings: AgentSettings, *, confirm: Confirm,
                    on_event: Callable[[AgentEvent], None]) -> AgentResult:
    """Run ``prompt`` to completion on the agent (see the module docstring)."""
    raise NotImplementedError("run_agent is being written")
