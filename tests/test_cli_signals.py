from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import tiny_llama, tiny_tokenizer


def test_sigterm_leaves_a_failed_run(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "long.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200_000)
    db = tmp_path / "opt.db"
    env = {**__import__("os").environ, "OPT_DB": str(db)}
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
