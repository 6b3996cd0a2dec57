from __future__ import annotations

import json
from pathlib import Path

import pytest

from openpto.errors import StoreError
from openpto.store import RunRecorder, Store

# Every table's columns in order, with their SQLite types and primary keys: a migration that
# changes any of it must change this too.
EXPECTED_SCHEMA = {
    "runs": {
        "id": "TEXT", "kind": "TEXT", "status": "TEXT", "model": "TEXT", "config": "TEXT",
        "started_at": "TEXT", "finished_at": "TEXT", "error": "TEXT", "pid": "INTEGER",
        "host": "TEXT", "process_started": "REAL",
    },
    "metrics": {
        "id": "INTEGER", "run_id": "TEXT", "name": "TEXT", "value": "REAL", "unit": "TEXT",
        "details": "TEXT",
    },
    "traces": {
        "id": "INTEGER", "run_id": "TEXT", "name": "TEXT", "started_at": "TEXT",
        "duration_ms": "REAL", "attributes": "TEXT",
    },
    "models": {
        "id": "TEXT", "path": "TEXT", "source_model": "TEXT", "method": "TEXT", "config": "TEXT",
        "size_bytes": "INTEGER", "created_at": "TEXT", "run_id": "TEXT",
    },
    "datasets": {
        "id": "TEXT", "name": "TEXT", "source": "TEXT", "sha256": "TEXT", "tokens": "INTEGER",
        "created_at": "TEXT",
    },
    "prompts": {
        "id": "INTEGER", "conversation_id": "TEXT", "model": "TEXT", "prompt": "TEXT",
        "response": "TEXT", "tokens_in": "INTEGER", "tokens_out": "INTEGER",
        "duration_ms": "REAL", "created_at": "TEXT", "source": "TEXT", "run_id": "TEXT",
        "source_id": "TEXT",
    },
    # the Agents SDK's SQLiteSession schema, created by the migration
    "agent_sessions": {"session_id": "TEXT", "created_at": "TIMESTAMP", "updated_at": "TIMESTAMP"},
    "agent_messages": {
        "id": "INTEGER", "session_id": "TEXT", "message_data": "TEXT", "created_at": "TIMESTAMP",
    },
}
PRIMARY_KEYS = {"runs": ["id"], "metrics": ["id"], "traces": ["id"], "models": ["id"],
                "datasets": ["id"], "prompts": ["id"], "agent_sessions": ["session_id"],
                "agent_messages": ["id"]}


def test_schema_is_pinned(tmp_path: Path) -> None:
    store = Store(tmp_path / "opt.db")
    assert set(store.db.table_names()) == {*EXPECTED_SCHEMA, "_migrations", "sqlite_sequence"}
    for table, columns in EXPECTED_SCHEMA.items():
        actual = {c.name: c.type for c in store.db[table].columns}
        assert list(actual.items()) == list(columns.items()), table
        assert store.db[table].pks == PRIMARY_KEYS[table], table
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [(fk.column, fk.other_table, fk.other_column)
            for fk in store.db["metrics"].foreign_keys] == [("run_id", "runs", "id")]
    assert [(fk.column, fk.other_table, fk.other_column)
            for fk in store.db["traces"].foreign_keys] == [("run_id", "runs", "id")]


def test_migrations_run_once(tmp_path: Path) -> None:
    Store(tmp_path / "opt.db")
    store = Store(tmp_path / "opt.db")
    assert [row["name"] for row in store.db["_migrations"].rows] == [
        "m001_initial", "m002_indexes", "m003_run_process",
        "m004_prompt_sources_and_agent_sessions"]


def test_run_succeeds_with_metrics_and_traces(tmp_path: Path) -> None:
    store = Store(tmp_path / "opt.db")
    with RunRecorder(store, "eval", "m", {"seq_len": 8}) as run:
        assert store.rows("runs")[0]["status"] == "running"
        with run.trace("load", device="cpu") as attrs:
            attrs["params"] = 3
        run.metric("perplexity", 12.5, "", {"seq_len": 8})
    row = store.rows("runs")[0]
    assert row["status"] == "succeeded" and row["finished_at"] and row["error"] is None
    assert json.loads(row["config"]) == {"seq_len": 8}
    (metric,) = store.rows("metrics")
    assert metric["value"] == 12.5 and metric["run_id"] == run.id
    (trace,) = store.rows("traces")
    assert json.loads(trace["attributes"]) == {"device": "cpu", "params": 3}
    assert trace["duration_ms"] >= 0


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_run_failure_is_recorded(tmp_path: Path, exc: BaseException) -> None:
    store = Store(tmp_path / "opt.db")
    with pytest.raises(type(exc)), RunRecorder(store, "eval", "m"):
        raise exc
    row = store.rows("runs")[0]
    assert row["status"] == "failed"
    assert row["error"].splitlines()[0].startswith(type(exc).__name__)


def test_readonly_query_refuses_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "opt.db")
    with RunRecorder(store, "eval", "m"):
        pass
    assert store.query_readonly("select count(*) as n from runs") == [{"n": 1}]
    with pytest.raises(StoreError, match="read-only"):
        store.query_readonly("delete from runs")
    assert store.db["runs"].count == 1
    with pytest.raises(StoreError, match="query failed"):
        store.query_readonly("select * from nowhere")


def test_export_json_and_csv(tmp_path: Path) -> None:
    store = Store(tmp_path / "opt.db")
    with RunRecorder(store, "eval", "m") as run:
        run.metric("x", 1.0)
    rows = json.loads(store.export("metrics", "json"))
    assert rows[0]["name"] == "x"
    csv_text = store.export("metrics", "csv")
    assert csv_text.splitlines()[0] == "id,run_id,name,value,unit,details"
    with pytest.raises(StoreError):
        store.export("metrics", "xml")
    with pytest.raises(StoreError):
        store.export("nope", "json")


def test_unwritable_database_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open"):
        Store(blocker / "sub" / "opt.db")


def test_store_module_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, openpto.store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_runs_record_their_process(tmp_path: Path) -> None:
    import os
    import socket

    import psutil

    store = Store(tmp_path / "opt.db")
    with RunRecorder(store, "eval", "m"):
        row = store.rows("runs")[0]
    assert (row["pid"], row["host"]) == (os.getpid(), socket.gethostname())
    assert row["process_started"] == pytest.approx(psutil.Process().create_time(), abs=1.0)


def _running_row(store: Store, run_id: str, **process: object) -> None:
    store.insert("runs", {"id": run_id, "kind": "eval", "status": "running", "model": "m",
                          "config": {}, "started_at": "2026-01-01T00:00:00.000+00:00",
                          "finished_at": None, "error": None, **process})


def test_only_runs_whose_process_is_gone_are_closed(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    import psutil

    store = Store(tmp_path / "opt.db")
    host = socket.gethostname()
    me = psutil.Process()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead_pid = int(child.stdout)  # exited and reaped: no such process any more
    _running_row(store, "alive", pid=os.getpid(), host=host, process_started=me.create_time())
    _running_row(store, "dead", pid=dead_pid, host=host, process_started=None)
    # This pid is alive, but it is not the process that started the run (pid reuse).
    _running_row(store, "reused", pid=os.getpid(), host=host,
                 process_started=me.create_time() - 3600)
    _running_row(store, "elsewhere", pid=dead_pid, host=host + "-other", process_started=None)

    reopened = Store(tmp_path / "opt.db")  # what the next command does
    assert reopened.close_stale_runs() == []  # opening it closed them; nothing is left
    rows = {r["id"]: r for r in store.rows("runs")}
    assert rows["alive"]["status"] == "running" and rows["elsewhere"]["status"] == "running"
    for run_id, pid in (("dead", dead_pid), ("reused", os.getpid())):
        assert rows[run_id]["status"] == "failed" and rows[run_id]["finished_at"]
        assert rows[run_id]["error"].startswith(f"stale: process {pid} on {host} ended")


def test_migrating_closes_runs_left_running_before_processes_were_recorded(
        tmp_path: Path) -> None:
    import sqlite_utils

    from openpto.store.migrations import m001_initial, m002_indexes

    path = tmp_path / "old.db"
    old = sqlite_utils.Database(path)
    old["_migrations"].create({"name": str, "applied_at": str}, pk="name")
    for fn in (m001_initial, m002_indexes):
        fn(old)
        old["_migrations"].insert({"name": fn.__name__, "applied_at": "2026-01-01"})
    for run_id, status in (("left", "running"), ("done", "succeeded")):
        old["runs"].insert({"id": run_id, "kind": "eval", "status": status, "model": "m",
                            "config": "{}", "started_at": "2026-01-01", "finished_at": None,
                            "error": None})
    old.close()
    rows = {r["id"]: r for r in Store(path).rows("runs")}
    assert rows["left"]["status"] == "failed" and rows["left"]["error"].startswith("stale:")
    assert rows["done"]["status"] == "succeeded" and rows["done"]["error"] is None
    assert rows["left"]["pid"] is None


def test_threads_opening_a_new_database_at_once_migrate_it_once(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "opt.db"
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_it() -> None:
        start.wait()
        try:
            Store(path)
        except BaseException as exc:  # reported below, by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = [row["name"] for row in Store(path).db["_migrations"].rows]
    assert len(names) == len(set(names)) == 4
