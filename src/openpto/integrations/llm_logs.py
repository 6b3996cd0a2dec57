"""``opt llm logs import``: what ``llm`` logged, copied into our ``prompts`` table.

``llm`` keeps its log in ``logs.db``, in one of two schemas: up to 0.31 a ``responses`` table
(one row per prompt and response); from 0.32 a content-addressed store of ``threads``, ``turns``,
``messages`` and ``parts``, with each turn's typed prompt and text response in ``turn_search``.
A database migrated across versions holds both, with no row in both. Each row lands in
``prompts`` with ``source = 'llm'`` and ``source_id`` = llm's response or turn id, which the
unique index on ``(source, source_id)`` makes idempotent: a second import adds nothing.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpto.errors import CorruptFile, UsageError

SOURCE = "llm"

_LEGACY = """
SELECT r.id AS source_id, r.conversation_id, r.model, r.prompt, r.response,
       r.input_tokens AS tokens_in, r.output_tokens AS tokens_out, r.duration_ms,
       r.datetime_utc AS created_at
FROM responses r ORDER BY r.datetime_utc, r.id
"""

_THREADS = """
SELECT t.id AS source_id, t.thread_id AS conversation_id, t.model, s.prompt, s.response,
       t.input_tokens AS tokens_in, t.output_tokens AS tokens_out, t.duration_ms,
       t.datetime_utc AS created_at
FROM turns t LEFT JOIN turn_search s ON s.turn_id = t.id ORDER BY t.datetime_utc, t.id
"""

_COLUMNS = ("conversation_id", "model", "prompt", "response", "tokens_in", "tokens_out",
            "duration_ms", "created_at", "source", "source_id")


@dataclass(frozen=True)
class LogImport:
    path: str
    imported: int
    seen: int
    schemas: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "imported": self.imported, "seen": self.seen,
                "schemas": list(self.schemas)}


def default_logs_path() -> Path:
    """Where ``llm`` keeps ``logs.db`` (``LLM_USER_PATH``, else its app folder)."""
    user = os.environ.get("LLM_USER_PATH")
    if user:
        return Path(user) / "logs.db"
    import click

    return Path(click.get_app_dir("io.datasette.llm")) / "logs.db"


def read_llm_logs(path: Path) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """Every logged prompt/response of ``path`` in our column names, and the schemas found."""
    if not path.is_file():
        raise UsageError(f"no llm log at {path} (set LLM_USER_PATH or pass the logs.db path)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise CorruptFile(f"cannot open {path}: {exc}") from exc
    try:
        conn.row_factory = sqlite3.Row
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        rows: list[dict[str, Any]] = []
        schemas: list[str] = []
        if "responses" in tables:
            schemas.append("responses")
            rows += [dict(r) for r in conn.execute(_LEGACY)]
        if {"turns", "turn_search"} <= tables:
            schemas.append("threads")
            rows += [dict(r) for r in conn.execute(_THREADS)]
    except sqlite3.DatabaseError as exc:
        raise CorruptFile(f"{path} is not an llm log database: {exc}") from exc
    finally:
        conn.close()
    if not schemas:
        raise CorruptFile(f"{path} has neither llm's responses table nor its turns table")
    return rows, tuple(schemas)


def import_llm_logs(path: str | Path | None = None, store: Any = None) -> LogImport:
    """Copy ``llm``'s log into ``prompts``; rows already imported are left as they are."""
    from openpto.store import Store

    source = Path(path).expanduser() if path else default_logs_path()
    rows, schemas = read_llm_logs(source)
    store = store or Store()
    placeholders = ", ".join("?" for _ in _COLUMNS)
    statement = (f"INSERT OR IGNORE INTO prompts ({', '.join(_COLUMNS)}) "
                 f"VALUES ({placeholders})")
    before = store.db.conn.total_changes
    with store.db.conn:
        store.db.conn.executemany(statement, [
            [*(row.get(c) for c in _COLUMNS[:8]), SOURCE, str(row["source_id"])]
            for row in rows])
    imported = store.db.conn.total_changes - before
    return LogImport(str(source), imported, len(rows), schemas)
