from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openpto.store import RunRecorder, Store
from tests.test_eval_cli import run_opt


@pytest.fixture
def db_with_a_run(tmp_db: Path) -> str:
    with RunRecorder(Store(), "eval", "smollm2-135m", {"seq_len": 512}) as run:
        with run.trace("eval", windows=8):
            pass
        run.metric("perplexity", 13.5, "", {"seq_len": 512})
    return run.id


def test_path(tmp_db: Path, capsys: pytest.CaptureFixture[str],
              monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_opt(["db", "path"], capsys, monkeypatch)
    assert code == 0 and out == f"{tmp_db}\n"


def test_tables_json(db_with_a_run: str, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_opt(["db", "tables", "--json"], capsys, monkeypatch)
    tables = json.loads(out)
    assert code == 0
    expected = {"runs": 1, "metrics": 1, "traces": 1, "datasets": 0, "models": 0}
    assert expected.items() <= tables.items()


def test_query_prints_a_json_array(db_with_a_run: str, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sql = ("select runs.id, metrics.name, metrics.value from runs "
           "join metrics on metrics.run_id = runs.id")
    code, out, _ = run_opt(["db", "query", sql], capsys, monkeypatch)
    assert code == 0
    assert json.loads(out) == [{"id": db_with_a_run, "name": "perplexity", "value": 13.5}]
    code, out, _ = run_opt(["db", "query", "select * from runs where 0"], capsys, monkeypatch)
    assert json.loads(out) == []


@pytest.mark.parametrize(
    "sql", ["delete from runs", "update runs set status = 'x'", "drop table metrics",
            "insert into datasets (id) values ('x')"],
)
def test_query_refuses_writes(sql: str, db_with_a_run: str, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    before = Store().tables()
    code, out, err = run_opt(["db", "query", sql], capsys, monkeypatch)
    assert code != 0 and out == ""
    (line,) = err.strip().splitlines()
    assert line == "error: opt db query is read-only: write statements are refused"
    assert Store().tables() == before
    assert Store().rows("runs")[0]["status"] == "succeeded"


def test_export_json_and_csv_to_files(db_with_a_run: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    json_file, csv_file = tmp_path / "runs.json", tmp_path / "metrics.csv"
    code, out, _ = run_opt(["db", "export", "runs", "--format", "json", "-o", str(json_file)],
                           capsys, monkeypatch)
    assert code == 0 and out == ""
    (row,) = json.loads(json_file.read_text())
    assert row["id"] == db_with_a_run and row["status"] == "succeeded"
    assert json.loads(row["config"]) == {"seq_len": 512}

    code, _, _ = run_opt(["db", "export", "metrics", "--format", "csv", "-o", str(csv_file)],
                         capsys, monkeypatch)
    assert code == 0
    (metric,) = list(csv.DictReader(csv_file.open()))
    assert list(metric) == ["id", "run_id", "name", "value", "unit", "details"]
    assert (metric["run_id"], metric["name"], float(metric["value"])) == (
        db_with_a_run, "perplexity", 13.5)

    code, _, err = run_opt(["db", "export", "runs", "--format", "xml"], capsys, monkeypatch)
    assert code != 0 and "unknown export format" in err


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_answers_tables_and_canned_queries(db_with_a_run: str, tmp_db: Path) -> None:
    pytest.importorskip("datasette")
    httpx = pytest.importorskip("httpx")
    port = _free_port()
    # Its own session: ``opt db serve`` starts Datasette as a child, and both must be stopped.
    proc = subprocess.Popen(
        [sys.executable, "-m", "openpto", "db", "serve", "--host", "127.0.0.1",
         "--port", str(port)],
        env={**os.environ, "OPT_DB": str(tmp_db)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/{tmp_db.stem}"
    try:
        runs = _poll_json(httpx, f"{base}/runs.json?_shape=array", proc, deadline_s=90)
        assert [r["id"] for r in runs] == [db_with_a_run]
        assert runs[0]["kind"] == "eval" and runs[0]["status"] == "succeeded"
        rows = httpx.get(f"{base}/latest_runs_with_metrics.json?_shape=array", timeout=10).json()
        assert rows == [{
            "id": db_with_a_run, "kind": "eval", "status": "succeeded", "model": "smollm2-135m",
            "started_at": runs[0]["started_at"], "name": "perplexity", "value": 13.5, "unit": "",
        }]
        metadata = httpx.get(f"http://127.0.0.1:{port}/-/metadata.json", timeout=10).json()
        assert metadata["title"] == "openpto runs"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this test started, and nothing else
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _poll_json(httpx, url: str, proc: subprocess.Popen[bytes], deadline_s: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"opt db serve exited with {proc.returncode}: {stderr}")
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"opt db serve did not answer {url} within {deadline_s} s")
