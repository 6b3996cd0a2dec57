from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import tiny_llama, tiny_tokenizer


def test_sigterm_leaves_a_failed_run(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "long.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200_000)
    db = tmp_path / "opt.db"
    env = {**os.environ, "OPT_DB": str(db)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "openpto", "eval", str(folder), "--text", str(text),
         "--seq-len", "64", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    row = sqlite3.connect(db).execute("select status from runs").fetchone()
                except sqlite3.Error:
                    row = None
                if row is not None:
                    status = row[0]
                    break
            time.sleep(0.2)
        assert status == "running", "the run row should exist while the command works"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == "error: terminated"
    status, error = sqlite3.connect(db).execute("select status, error from runs").fetchone()
    assert status == "failed"
    assert error.startswith("Terminated")


def test_usage_errors_are_one_clear_message_without_traceback() -> None:
    for args, needle in (
        (["eval", "--seq-len", "abc"], "Invalid value for '--seq-len'"),
        (["nosuch"], "No such command 'nosuch'"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "openpto", *args], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 2
        assert needle in out.stderr
        assert "Traceback" not in out.stderr


def _read_until(stream: Any, predicate: Any, lines: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise AssertionError("the command ended before: " + "".join(lines))
        lines.append(line)
        if predicate(json.loads(line)):
            return
    raise AssertionError("timed out waiting on: " + "".join(lines))


def test_a_burst_of_sigterms_while_the_model_loads_leaves_a_failed_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process group and its parent both forwarding SIGTERM deliver a burst: later signals of
    it used to land inside the final status write and leave the run ``running`` for good.

    The default model's conversion lock is held here, as a second process converting it would
    hold it, so the command is still loading when the signals come."""
    from openpto.models.cache import building, file_sha256, models_cache_dir, safe_name
    from openpto.models.loader import resolve_model

    home = tmp_path / "home"
    monkeypatch.setenv("OPT_HOME", str(home))
    source = resolve_model(None)
    final = models_cache_dir() / f"{safe_name(source.name)}-{file_sha256(source.path)[:12]}"
    db = tmp_path / "opt.db"
    lines: list[str] = []
    sent = 0
    with building(final) as converting:
        assert converting is not None
        proc = subprocess.Popen(
            [sys.executable, "-m", "openpto", "quantize", "--method", "rtn", "--output",
             str(tmp_path / "art"), "--progress", "jsonl", "--json"],
            env={**os.environ, "OPT_DB": str(db)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stderr is not None
            _read_until(proc.stderr, lambda e: e["event"] == "message"
                        and e["message"].startswith("loading the default model"), lines)
            time.sleep(1.0)  # past the message's own write, into the load
            while proc.poll() is None and sent < 50_000:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                sent += 1
                time.sleep(0.001)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert sent > 1 and proc.returncode == 143 and out == ""
    events = [json.loads(line) for line in lines + err.splitlines()]
    run_id = events[0]["run_id"]
    assert events[-1] == {**events[-1], "event": "run_failed", "run_id": run_id,
                          "error": "Terminated: terminated by signal 15"}
    conn = sqlite3.connect(db)
    status, error = conn.execute("select status, error from runs where id = ?", [run_id]).fetchone()
    assert status == "failed" and error.startswith("Terminated: terminated by signal 15")
    (load,) = conn.execute("select attributes from traces where name = 'load'").fetchone()
    assert json.loads(load)["error"].startswith("Terminated")  # it landed during the load


def test_a_run_whose_process_was_killed_is_marked_failed_by_the_next_command(
        tmp_path: Path) -> None:
    db = tmp_path / "opt.db"
    code = (
        "import os, signal\n"
        "from openpto.store import RunRecorder, Store\n"
        f"run = RunRecorder(Store({str(db)!r}), 'quantize', 'm')\n"
        "run.start()\n"
        "print(run.id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL
    run_id = killed.stdout.strip()
    status, pid = sqlite3.connect(db).execute(
        "select status, pid from runs where id = ?", [run_id]).fetchone()
    assert status == "running" and pid > 0  # nothing could record the kill itself

    out = subprocess.run(
        [sys.executable, "-m", "openpto", "db", "query", "select id, status, error from runs"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OPT_DB": str(db)},
    )
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["id"] == run_id and row["status"] == "failed"
    assert row["error"].startswith(f"stale: process {pid} on ")
