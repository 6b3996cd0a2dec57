"""Agent conversations in ``opt.db``: the SDK's session tables and one ``prompts`` row per exchange.

The Agents SDK's ``SQLiteSession`` writes ``agent_sessions`` (one row per conversation, named by
``--session``) and ``agent_messages`` (every input and output item as the SDK's JSON). Each
exchange — one prompt and the agent's final answer — is also a ``prompts`` row with ``source``
'agent', ``conversation_id`` the session name and ``run_id`` the ``agent`` run, so the prompts of
every front end can be read in one table. This module reads both for ``opt agent history``; it
does not import the SDK.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openpto.errors import UsageError


def _store(db_path: Path | None) -> Any:
    from openpto.store import Store

    return Store(db_path)


def record_exchange(store: Any, *, session: str, model: str, prompt: str, response: str,
                    tokens_in: int | None, tokens_out: int | None, duration_ms: float,
                    run_id: str) -> None:
    from openpto.store.db import now_iso

    store.insert("prompts", {
        "conversation_id": session, "model": model, "prompt": prompt, "response": response,
        "tokens_in": tokens_in, "tokens_out": tokens_out, "duration_ms": duration_ms,
        "created_at": now_iso(), "source": "agent", "run_id": run_id,
    })


def list_sessions(db_path: Path | None = None) -> list[dict[str, Any]]:
    """Every conversation, the latest first: name, when it started and last changed, how many
    messages and exchanges it holds, and its last prompt."""
    rows = _store(db_path).db.execute("""
        SELECT s.session_id AS session, s.created_at, s.updated_at,
               (SELECT count(*) FROM agent_messages m WHERE m.session_id = s.session_id)
                   AS messages,
               (SELECT count(*) FROM prompts p
                 WHERE p.source = 'agent' AND p.conversation_id = s.session_id) AS exchanges,
               (SELECT p.prompt FROM prompts p
                 WHERE p.source = 'agent' AND p.conversation_id = s.session_id
                 ORDER BY p.id DESC LIMIT 1) AS last_prompt
          FROM agent_sessions s
         ORDER BY s.updated_at DESC, s.session_id""").fetchall()
    keys = ("session", "created_at", "updated_at", "messages", "exchanges", "last_prompt")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def session_messages(name: str, db_path: Path | None = None) -> list[dict[str, Any]]:
    """The messages of conversation ``name`` in order: each ``role`` (user, assistant, tool),
    ``kind`` (message, tool_call, tool_result), ``text`` and ``created_at``."""
    db = _store(db_path).db
    if not db.execute("SELECT 1 FROM agent_sessions WHERE session_id = ?", [name]).fetchone():
        known = [r[0] for r in db.execute("SELECT session_id FROM agent_sessions ORDER BY "
                                          "updated_at DESC LIMIT 10").fetchall()]
        hint = f" (recent: {', '.join(known)})" if known else " (there are none yet)"
        raise UsageError(f"no agent session {name!r}{hint}")
    rows = db.execute("SELECT message_data, created_at FROM agent_messages WHERE session_id = ? "
                      "ORDER BY id", [name]).fetchall()
    return [{**describe_item(json.loads(data)), "created_at": created} for data, created in rows]


def describe_item(item: dict[str, Any]) -> dict[str, Any]:
    """One SDK input/output item as ``role``, ``kind`` and ``text`` for people."""
    kind = item.get("type", "message")
    if kind == "function_call":
        return {"role": "assistant", "kind": "tool_call", "name": item.get("name"),
                "text": f"{item.get('name')}({item.get('arguments', '')})"}
    if kind == "function_call_output":
        return {"role": "tool", "kind": "tool_result", "text": _text(item.get("output"))}
    return {"role": item.get("role", "assistant"), "kind": "message",
            "text": _text(item.get("content"))}


def _text(content: Any) -> str:
    """The text of an item's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content, default=str)
