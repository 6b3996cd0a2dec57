"""Reads of the run database for the screens (the store imports no torch)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from openpto.store import Store


def open_store(path: Path | None) -> Store:
    return Store(path)


def recent_runs(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    return store.query_readonly(
        "SELECT id, kind, status, model, started_at, finished_at, error FROM runs "
        "ORDER BY started_at DESC LIMIT ?", [limit])


def artifacts(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    return store.query_readonly(
        "SELECT id, path, method, size_bytes, created_at, run_id FROM models "
        "ORDER BY created_at DESC LIMIT ?", [limit])


def table_names(store: Store) -> dict[str, int]:
    return store.tables()


def table_rows(store: Store, table: str, text: str = "", order_by: str | None = None,
               descending: bool = True, limit: int = 500) -> tuple[list[str], list[dict[str, Any]]]:
    """A table's columns and rows whose any column contains ``text`` (case-insensitive)."""
    names = store.tables()
    if table not in names:
        raise ValueError(f"no table {table!r}")
    columns = [c[1] for c in store.db.execute(f'PRAGMA table_info("{table}")').fetchall()]
    where, params = "", []
    if text:
        where = " WHERE " + " OR ".join(f'CAST("{c}" AS TEXT) LIKE ?' for c in columns)
        params = [f"%{text}%"] * len(columns)
    order = ""
    if order_by in columns:
        order = f' ORDER BY "{order_by}" {"DESC" if descending else "ASC"}'
    # The table and column names were checked against the schema above; values are parameters.
    sql = f'SELECT * FROM "{table}"{where}{order} LIMIT {int(limit)}'  # nosec B608
    rows = store.query_readonly(sql, params)
    return columns, rows


def run_detail(store: Store, run_id: str) -> dict[str, Any]:
    runs = store.query_readonly("SELECT * FROM runs WHERE id = ?", [run_id])
    if not runs:
        raise ValueError(f"no run {run_id!r}")
    run = runs[0]
    with_config = dict(run)
    if isinstance(run.get("config"), str):
        with contextlib.suppress(ValueError):
            with_config["config"] = json.loads(run["config"])
    return {
        "run": with_config,
        "metrics": store.query_readonly(
            "SELECT name, value, unit, details FROM metrics WHERE run_id = ? ORDER BY id",
            [run_id]),
        "traces": store.query_readonly(
            "SELECT name, duration_ms, attributes FROM traces WHERE run_id = ? ORDER BY id",
            [run_id]),
        "models": store.query_readonly("SELECT * FROM models WHERE run_id = ?", [run_id]),
    }
