"""Ordered schema migrations, after ``llm``'s model: each function runs once, in order, and its
name is recorded in ``_migrations``. Never edit a released migration; add a new one."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["runs"].create(  # type: ignore[union-attr]
        {
            "id": str,
            "kind": str,
            "status": str,
            "model": str,
            "config": str,
            "started_at": str,
            "finished_at": str,
            "error": str,
        },
        pk="id",
    )
    db["metrics"].create(  # type: ignore[union-attr]
        {
            "id": int,
            "run_id": str,
            "name": str,
            "value": float,
            "unit": str,
            "details": str,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db["traces"].create(  # type: ignore[union-attr]
        {
            "id": int,
            "run_id": str,
            "name": str,
            "started_at": str,
            "duration_ms": float,
            "attributes": str,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db["models"].create(  # type: ignore[union-attr]
        {
            "id": str,
            "path": str,
            "source_model": str,
            "method": str,
            "config": str,
            "size_bytes": int,
            "created_at": str,
            "run_id": str,
        },
        pk="id",
    )
    db["datasets"].create(  # type: ignore[union-attr]
        {
            "id": str,
            "name": str,
            "source": str,
            "sha256": str,
            "tokens": int,
            "created_at": str,
        },
        pk="id",
    )
    db["prompts"].create(  # type: ignore[union-attr]
        {
            "id": int,
            "conversation_id": str,
            "model": str,
            "prompt": str,
            "response": str,
            "tokens_in": int,
            "tokens_out": int,
            "duration_ms": float,
            "created_at": str,
        },
        pk="id",
    )


@migration
def m002_indexes(db: sqlite_utils.Database) -> None:
    db["metrics"].create_index(["run_id"])  # type: ignore[union-attr]
    db["traces"].create_index(["run_id"])  # type: ignore[union-attr]
    db["runs"].create_index(["started_at"])  # type: ignore[union-attr]
    db["metrics"].create_index(["name"])  # type: ignore[union-attr]


@migration
def m003_run_process(db: sqlite_utils.Database) -> None:
    """Each run names the process that records it, so a run whose process died can be told
    from one still going; runs left ``running`` before this was recorded cannot be told apart,
    so they are closed here (a process of an older version still running them would write its
    own final status over this one)."""
    runs = db["runs"]
    runs.add_column("pid", int)  # type: ignore[union-attr]
    runs.add_column("host", str)  # type: ignore[union-attr]
    # psutil's create_time of the process: a pid reused by a later process does not match.
    runs.add_column("process_started", float)  # type: ignore[union-attr]
    db.execute(
        "UPDATE runs SET status = 'failed', finished_at = ?, error = ? WHERE status = 'running'",
        [_now(), "stale: left 'running' by a process that did not record its id (recorded "
                 "before runs carried one); marked failed when the database was migrated"],
    )


@migration
def m004_prompt_sources_and_agent_sessions(db: sqlite_utils.Database) -> None:
    """Prompts come from several front ends now (the agent, the server, ``llm``, the TUI):
    each row says which, and the run it belongs to. ``source_id`` is the record's id in the
    system it was imported from (``llm``'s response id), unique per source, so an import run
    twice adds nothing. The Agents SDK's SQLite session tables are created here with the SDK's
    own schema so that they exist, and are browsable, before the first conversation."""
    prompts = db["prompts"]
    prompts.add_column("source", str)  # type: ignore[union-attr]
    prompts.add_column("run_id", str)  # type: ignore[union-attr]
    prompts.add_column("source_id", str)  # type: ignore[union-attr]
    db.execute("UPDATE prompts SET source = 'server' WHERE source IS NULL")
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS idx_prompts_source_id "
               "ON prompts (source, source_id) WHERE source_id IS NOT NULL")
    prompts.create_index(["conversation_id"], if_not_exists=True)  # type: ignore[union-attr]
    db.execute("""
        CREATE TABLE IF NOT EXISTS agent_sessions (
            session_id TEXT PRIMARY KEY,
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
        )""")
    db.execute("""
        CREATE TABLE IF NOT EXISTS agent_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL,
            message_data TEXT NOT NULL,
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            FOREIGN KEY (session_id) REFERENCES agent_sessions (session_id) ON DELETE CASCADE
        )""")
    db.execute("CREATE INDEX IF NOT EXISTS idx_agent_messages_session_id "
               "ON agent_messages (session_id, id)")


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply every migration not yet applied; return the names applied now.

    Two openers of a new database (two threads of one UI, or two processes) would otherwise
    both see a migration as missing and apply it twice; the second would fail ("duplicate
    column"). So a database that needs migrating is migrated under an exclusive lock, and what
    is done is read again once the lock is held."""
    if _pending(db):
        with _migration_lock(db):
            return _apply(db)
    return []


def _done(db: sqlite_utils.Database) -> set[str]:
    if "_migrations" not in db.table_names():
        return set()
    return {row["name"] for row in db["_migrations"].rows}


def _pending(db: sqlite_utils.Database) -> bool:
    done = _done(db)
    return any(fn.__name__ not in done for fn in MIGRATIONS)


def _apply(db: sqlite_utils.Database) -> list[str]:
    db["_migrations"].create(  # type: ignore[union-attr]
        {"name": str, "applied_at": str}, pk="name", if_not_exists=True
    )
    done = _done(db)
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        with db.conn:
            fn(db)
            db["_migrations"].insert(  # type: ignore[union-attr]
                {"name": fn.__name__, "applied_at": _now()}
            )
        applied.append(fn.__name__)
    return applied


_THREAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _migration_lock(db: sqlite_utils.Database) -> Iterator[None]:
    """This process's threads queue on a lock; other processes on an advisory lock of a file
    beside the database (none for an in-memory database)."""
    rows = db.execute("PRAGMA database_list").fetchall()
    path = next((row[2] for row in rows if row[1] == "main"), "")
    with _THREAD_LOCK:
        if not path:
            yield
            return
        with open(f"{path}.migrate-lock", "a") as handle:
            try:
                import fcntl
            except ImportError:  # no advisory locks here: threads of one process still queue
                yield
                return
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
