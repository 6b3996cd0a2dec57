"""The real Agents SDK against a real ``opt serve`` of the default model on loopback.

No endpoint is configured, so the agent starts our own server in-process (a free loopback port,
a random key) and talks to it through the SDK's chat-completions model and the ``openai``
client. A forced tool choice makes the 135M model call ``list_artifacts``; the SDK executes it
against the real library and database, feeds the result back, and the model's final message
arrives. Only the tool is forced: what the model then says is its own.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("agents")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

from openpto.agents.runner import (
    AgentSettings,
    TextDelta,
    ToolCalled,
    ToolFinished,
    run_agent,
)
from openpto.store import Store


@pytest.mark.integration
def test_forced_tool_call_runs_on_the_real_library_and_the_answer_arrives(
        tmp_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    artifact = {"id": "tiny-rtn8", "path": str(tmp_path / "tiny-rtn8"), "method": "rtn",
                "size_bytes": 123456, "created_at": "2026-12-08T00:00:00.000+00:00"}
    Store(tmp_db).insert("models", artifact)
    events: list[Any] = []

    async def never(name: str, arguments: dict[str, Any]) -> bool:
        raise AssertionError("list_artifacts needs no confirmation")

    # One tool keeps the prompt short for a 135M model on a CPU; a small reply budget keeps
    # the test quick.
    settings = AgentSettings(db_path=tmp_db, session="served", tools=("list_artifacts",),
                             tool_choice="list_artifacts", max_tokens=24, max_turns=3)
    result = asyncio.run(run_agent("What artifacts do I have?", settings, confirm=never,
                                   on_event=events.append))

    (called,) = [e for e in events if isinstance(e, ToolCalled)]
    assert (called.name, called.arguments) == ("list_artifacts", {})
    (finished,) = [e for e in events if isinstance(e, ToolFinished)]
    assert finished.ok and finished.call_id == called.call_id
    assert json.loads(finished.output) == {"artifacts": [artifact]}
    assert result.tool_calls == [{"name": "list_artifacts", "arguments": {}, "ok": True}]
    # The final message arrived, streamed: the deltas after the call make up the output.
    assert result.output.strip()
    after = events[events.index(finished) + 1:]
    assert "".join(e.text for e in after if isinstance(e, TextDelta)) == result.output

    store = Store(tmp_db)
    (run,) = store.rows("runs", "kind = 'agent'")
    assert run["status"] == "succeeded" and run["model"] == "smollm2-135m"
    assert json.loads(run["config"])["endpoint"]["builtin"] is True
    (prompt,) = store.rows("prompts", "source = 'agent'")
    assert prompt["run_id"] == result.run_id and prompt["response"] == result.output
    assert prompt["tokens_in"] > 0 and prompt["tokens_out"] > 0  # as the server counted them
    kinds = [json.loads(m["message_data"]).get("type", "message")
             for m in store.rows("agent_messages", "session_id = 'served'")]
    assert kinds == ["message", "function_call", "function_call_output", "message"]
