"""``--progress rich|jsonl|none`` on a real ``opt`` process: every stderr line of ``jsonl`` is
a JSON event, the last one says how the run ended, and the run database agrees."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("progress") / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def opt(args: list[str], db: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openpto", *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OPT_DB": str(db), "COLUMNS": "200", **env},
    )


def events_of(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line parsed as JSON (a line that is not fails the test here)."""
    lines = stderr.splitlines()
    assert lines, "no events on stderr"
    return [json.loads(line) for line in lines]


def test_quantize_jsonl_reports_each_layer_and_ends_with_the_run_id(
        tiny_folder: Path, tmp_path: Path) -> None:
    db = tmp_path / "opt.db"
    out = opt(["quantize", str(tiny_folder), "--method", "rtn", "--bits", "4", "--group-size",
               "32", "--output", str(tmp_path / "art"), "--progress", "jsonl", "--json"], db)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    events = events_of(out.stderr)
    assert {e["run_id"] for e in events} == {result["run_id"]}
    assert events[0]["event"] == "run_started" and events[0]["kind"] == "quantize"
    assert events[0]["config"]["method"] == "rtn"

    layers = [e for e in events if e["event"] == "layer_done"]
    assert [(e["index"], e["total"], e["name"]) for e in layers] == [
        (0, 2, "model.layers.0"), (1, 2, "model.layers.1")]
    names = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    for layer in layers:
        assert set(layer["error"]) == names
        assert all(v > 0 for v in layer["error"].values()) and layer["seconds"] > 0

    # The layer errors are the ones the run recorded, and so is every metric.
    rows = sqlite3.connect(db).execute(
        "select name, value, unit from metrics where run_id = ?", [result["run_id"]]).fetchall()
    metrics = [(e["name"], e["value"], e["unit"]) for e in events if e["event"] == "metric"]
    assert metrics == rows and ("size_bytes_after", result["size_bytes_after"], "bytes") in rows
    every_error = [v for layer in layers for v in layer["error"].values()]
    mean = dict((n, v) for n, v, _ in rows)["layer_error_mean"]
    assert mean == pytest.approx(sum(every_error) / len(every_error), rel=1e-9)

    stages = [e for e in events if e["event"] in ("stage_started", "stage_finished")]
    assert [(e["event"], e["stage"]) for e in stages] == [
        ("stage_started", "quantize (rtn w4)"), ("stage_finished", "quantize (rtn w4)")]
    assert stages[1]["completed"] == 2 and stages[1]["error"] is None

    last = events[-1]
    assert last["event"] == "run_finished" and last["run_id"] == result["run_id"]
    assert last["result"] == result
    (status,) = sqlite3.connect(db).execute("select status from runs").fetchone()
    assert status == "succeeded"


def test_a_failing_run_ends_with_run_failed_carrying_the_error(
        tiny_folder: Path, tmp_path: Path) -> None:
    db = tmp_path / "opt.db"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = opt(["quantize", str(tiny_folder), "--method", "rtn", "--output", str(blocker),
               "--progress", "jsonl", "--json"], db)
    assert out.returncode != 0 and out.stdout == ""
    events = events_of(out.stderr)
    assert events[0]["event"] == "run_started"
    last = events[-1]
    assert last["event"] == "run_failed" and last["run_id"] == events[0]["run_id"]
    assert last["error"] == f"UsageError: --output {blocker} is a file; give a folder path"
    status, error = sqlite3.connect(db).execute("select status, error from runs").fetchone()
    assert status == "failed" and error.startswith(last["error"])
    assert blocker.read_text() == "not a folder"


def test_a_usage_error_is_one_run_failed_line_without_a_run(tmp_path: Path) -> None:
    out = opt(["quantize", "--bits", "abc", "--progress", "jsonl"], tmp_path / "opt.db")
    assert out.returncode == 2
    (event,) = events_of(out.stderr)
    assert event["event"] == "run_failed" and event["run_id"] is None
    assert "Invalid value for '--bits'" in event["error"]


def test_rich_progress_draws_the_stages_and_none_draws_nothing(
        tiny_folder: Path, tmp_path: Path) -> None:
    db = tmp_path / "opt.db"
    args = ["quantize", str(tiny_folder), "--method", "rtn", "--group-size", "32", "--json"]
    rich = opt([*args, "--output", str(tmp_path / "a")], db)
    assert rich.returncode == 0, rich.stderr
    assert f"loading {tiny_folder}" in rich.stderr
    assert "quantize (rtn w4)" in rich.stderr and "2/2" in rich.stderr
    assert "mean error" in rich.stderr and "model.layers.1 (2/2)" in rich.stderr
    assert "Loading weights" not in rich.stderr  # transformers' own bar stays off
    assert json.loads(rich.stdout)["method"] == "rtn"

    none = opt([*args, "--output", str(tmp_path / "b"), "--progress", "none"], db)
    assert none.returncode == 0 and none.stderr == ""
    assert json.loads(none.stdout)["run_id"] != json.loads(rich.stdout)["run_id"]


def test_jsonl_keeps_stderr_for_events_alone(tmp_path: Path) -> None:
    """Whatever else writes to stderr (tqdm bars such as the GGUF conversion's, C libraries,
    child processes, Rich, print) is kept off it; Python warnings and log records become
    warning events of the open run."""
    code = (
        "import logging, os, subprocess, sys, warnings\n"
        "from openpto.cli.common import claim_stderr_for_jsonl, stderr as rich_stderr\n"
        "from openpto.progress import ProgressEmitter, RunStarted, RunFinished\n"
        "sink = claim_stderr_for_jsonl()\n"
        "emitter = ProgressEmitter(sink, run_id='r1')\n"
        "emitter.emit(RunStarted, kind='quantize', model='m')\n"
        "from tqdm.auto import tqdm\n"
        "for _ in tqdm(range(3), desc='Converting and de-quantizing GGUF tensors...'): pass\n"
        "os.write(2, b'written by a C library\\n')\n"
        "print('printed to stderr', file=sys.stderr, flush=True)\n"
        "rich_stderr.print('[bold]rich[/bold] text')\n"
        "subprocess.run([sys.executable, '-c', 'import sys; sys.stderr.write(\"child\\\\n\")'])\n"
        "warnings.warn('a deprecated flag')\n"
        "logging.getLogger('somelib').warning('low disk space')\n"
        "emitter.log('done')\n"
        "emitter.emit(RunFinished, seconds=1.0)\n"
        "warnings.warn('after the run')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OPT_DB": str(tmp_path / "opt.db")})
    assert out.returncode == 0, out.stderr
    events = events_of(out.stderr)
    assert [(e["event"], e.get("message")) for e in events] == [
        ("run_started", None), ("warning", "a deprecated flag"), ("warning", "low disk space"),
        ("message", "done"), ("run_finished", None)]
    assert events[1]["category"] == "UserWarning" and events[2]["category"] == "somelib"


@pytest.mark.parametrize("command", ["eval", "quantize", "sparsify", "export", "generate",
                                     "speculative", "profile", "bench"])
def test_every_command_that_runs_a_workflow_takes_progress(command: str) -> None:
    from typer.testing import CliRunner

    from openpto.cli.main import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--progress" in result.output and "rich|jsonl|none" in result.output.replace(" ", "")
