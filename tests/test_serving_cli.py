"""`opt serve` from the command line: help, a real server process, the recorded run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from openpto.serving.background import free_port
from tests.test_serving import chat_tokenizer, varied_tiny_model


def test_serve_help_has_an_example() -> None:
    from typer.testing import CliRunner

    from openpto.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    assert "Example: opt serve" in result.output and "--api-key" in result.output


def test_opt_serve_process_serves_and_records_its_run(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-model"
    varied_tiny_model().save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    db = tmp_path / "opt.db"
    port = free_port()
    env = {**os.environ, "OPT_DB": str(db), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "openpto", "serve", str(folder), "--port", str(port),
         "--api-key", "k", "--json", "--max-batch", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        assert started["url"] == f"http://127.0.0.1:{port}" and started["model"] == "tiny-model"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(started["url"] + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        reply = httpx.post(started["url"] + "/v1/completions",
                           json={"model": "tiny-model", "prompt": "x", "max_tokens": 3,
                                 "temperature": 0},
                           headers={"Authorization": "Bearer k"}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert process.stdout is not None
    from openpto.store import Store

    store = Store(db)
    run = store.rows("runs", "id = ?", [started["run_id"]])[0]
    assert run["kind"] == "serve" and run["status"] == "succeeded", run["error"]
    assert "k" not in json.dumps(json.loads(run["config"]).get("api_key", ""))
    metrics = {m["name"]: m["value"] for m in store.rows("metrics", "run_id = ?", [run["id"]])}
    assert metrics["requests"] == 1 and metrics["generation_tokens"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "nope"], "unknown generation backend 'nope'"),
        (["/no/such/model"], "no such file or folder"),
    ],
)
def test_opt_serve_fails_fast_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    env = {**os.environ, "OPT_DB": str(tmp_path / "opt.db")}
    done = subprocess.run([sys.executable, "-m", "openpto", "serve", *args, "--port",
                           str(free_port())], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
