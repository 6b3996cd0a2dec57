"""Opening the database: where it lives, WAL mode, migrations, read-only queries, export."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from openpto.errors import StoreError
from openpto.store.migrations import migrate
from openpto.store.process import process_alive, signals_held

TABLES = ("runs", "metrics", "traces", "models", "datasets", "prompts", "agent_sessions",
          "agent_messages")


def opt_home() -> Path:
    """``OPT_HOME`` or ``~/.openpto``: the database, config, cached conversions and artifacts."""
    return Path(os.environ.get("OPT_HOME") or Path.home() / ".openpto").expanduser()


def default_db_path() -> Path:
    env = os.environ.get("OPT_DB")
    return Path(env).expanduser() if env else opt_home() / "opt.db"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id() -> str:
    return uuid.uuid4().hex[:16]


class Store:
    """The run database. Created and migrated on first use; WAL so readers never block writers."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite_utils.Database(self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=5000")
            migrate(self.db)
            self.close_stale_runs()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the database {self.path}: {exc}") from exc

    def close_stale_runs(self) -> list[str]:
        """Mark ``failed`` the ``running`` runs of this host whose process no longer exists;
        return their ids. Runs of other hosts are left alone: their processes cannot be seen."""
        host = socket.gethostname()
        rows = self.db.execute(
            "SELECT id, pid, process_started FROM runs "
            "WHERE status = 'running' AND host = ? AND pid IS NOT NULL",
            [host],
        ).fetchall()
        closed = []
        for run_id, pid, started in rows:
            if process_alive(int(pid), started):
                continue
            error = (f"stale: process {pid} on {host} ended without finishing this run (killed "
                     "or crashed before it could record the outcome); marked failed by a later "
                     "command")
            with self.db.conn:
                cursor = self.db.execute(
                    "UPDATE runs SET status = 'failed', finished_at = ?, error = ? "
                    "WHERE id = ? AND status = 'running'",
                    [now_iso(), error, run_id],
                )
            if cursor.rowcount:
                closed.append(run_id)
        return closed

    # -- writes -----------------------------------------------------------------------------
    # Each write holds Ctrl-C and SIGTERM back until it is committed, so that the trace or
    # status of a stage that a signal interrupts is still recorded (the signal follows).
    def insert(self, table: str, row: dict[str, Any]) -> None:
        with self._writing(), signals_held(), self.db.conn:
            self.db[table].insert(_jsonify(row))  # type: ignore[union-attr]

    def upsert(self, table: str, row: dict[str, Any], pk: str = "id") -> None:
        with self._writing(), signals_held(), self.db.conn:
            self.db[table].upsert(_jsonify(row), pk=pk)  # type: ignore[union-attr]

    def update(self, table: str, pk: str, values: dict[str, Any]) -> None:
        with self._writing(), signals_held(), self.db.conn:
            self.db[table].update(pk, _jsonify(values))  # type: ignore[union-attr]

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A write that SQLite refuses (locked, read-only, disk full) is one clear StoreError."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                reason = "is locked by another process (waited 5 s for it)"
            elif "readonly" in text or "read-only" in text:
                reason = "is read-only (check the file's and its folder's permissions)"
            elif "full" in text:
                reason = "cannot grow: the disk is full"
            else:
                reason = "refused a write"
            raise StoreError(f"the database {self.path} {reason}: {text}") from exc

    def record_dataset(
        self, name: str, source: str, sha256: str, tokens: int
    ) -> str:
        dataset_id = f"{sha256[:16]}-{tokens}"
        self.upsert(
            "datasets",
            {
                "id": dataset_id,
                "name": name,
                "source": source,
                "sha256": sha256,
                "tokens": tokens,
                "created_at": now_iso(),
            },
        )
        return dataset_id

    # -- reads ------------------------------------------------------------------------------
    def rows(
        self, table: str, where: str | None = None, params: Any = None
    ) -> list[dict[str, Any]]:
        if table not in self.db.table_names():
            raise StoreError(f"no table {table!r} (tables: {', '.join(self.db.table_names())})")
        return list(self.db[table].rows_where(where, params or []))  # type: ignore[union-attr]

    def tables(self) -> dict[str, int]:
        return {name: self.db[name].count for name in self.db.table_names()}  # type: ignore[union-attr]

    def query_readonly(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        """Run SQL on a read-only connection: a write statement fails instead of writing."""
        uri = f"file:{self.path}?mode=ro"
        conn = sqlite3.connect(uri, uri=True)
        conn.row_factory = sqlite3.Row
        try:
            cursor = conn.execute(sql, params or [])
            return [dict(row) for row in cursor.fetchall()]
        except sqlite3.OperationalError as exc:
            if "readonly" in str(exc) or "read-only" in str(exc):
                raise StoreError(
                    "opt db query is read-only: write statements are refused"
                ) from exc
            raise StoreError(f"query failed: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"query failed: {exc}") from exc
        finally:
            conn.close()

    def export(self, table: str, fmt: str) -> str:
        rows = self.rows(table)
        if fmt == "json":
            return json.dumps(rows, indent=2, default=str)
        if fmt == "csv":
            buffer = io.StringIO()
            columns = list(self.db[table].columns_dict)  # type: ignore[union-attr]
            writer = csv.DictWriter(buffer, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
            return buffer.getvalue()
        raise StoreError(f"unknown export format {fmt!r} (json or csv)")


def _jsonify(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, default=str)
        out[key] = value
    return out
