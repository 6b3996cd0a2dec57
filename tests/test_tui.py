"""The terminal UI driven through Textual's Pilot: real ``opt`` subprocesses, a real database,
a real server on a free port."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("textual")

from textual.widgets import DataTable, Input, Label, RichLog, Select

from openpto.tui.app import OptApp, make_app
from openpto.tui.forms import Catalog
from openpto.user_config import load
from tests.tui_helpers import (
    MACHINE,
    registered_configs,
    save_tiny_model,
    sync,
    wait_for,
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tui") / "tiny")


@pytest.fixture(scope="module")
def configs() -> list[dict[str, Any]]:
    return registered_configs()


def app_for(tmp_path: Path, configs: list[dict[str, Any]], **kwargs: Any) -> OptApp:
    return make_app(db_path=tmp_path / "opt.db", config_file=tmp_path / "config.toml",
                    catalog=Catalog(configs), machine=MACHINE, **kwargs)


async def open_quantize(app: OptApp, pilot: Any, model: Path, method: str = "rtn") -> Any:
    await pilot.press("f3")
    screen = app.screen
    select = screen.query_one("#method", Select)
    await wait_for(pilot, lambda: not select.is_blank(), what="the method list")
    select.value = method
    form = screen.query_one("#form")
    await wait_for(pilot, lambda: form.built_for == method, what="the form")
    screen.query_one("#model").value = str(model)
    return screen


def run_status(db: Path, run_id: str) -> tuple[str, str | None]:
    row = sqlite3.connect(db).execute("SELECT status, error FROM runs WHERE id = ?",
                                      [run_id]).fetchone()
    return row[0], row[1]


@sync
async def test_a_quantize_completes_and_shows_in_runs_and_home(
        tmp_path: Path, tiny_folder: Path, configs: list[dict[str, Any]]) -> None:
    app = app_for(tmp_path, configs)
    output = tmp_path / "tiny-rtn"
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_quantize(app, pilot, tiny_folder)
        screen.query_one("#field-bits", Input).value = "4"
        screen.query_one("#field-group_size", Input).value = "32"
        screen.query_one("#opt-samples", Input).value = "4"
        screen.query_one("#opt-calib-seq-len", Input).value = "32"
        screen.query_one("#opt-output", Input).value = str(output)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: screen.last_outcome is not None, what="the job")
        outcome = screen.last_outcome
        assert outcome.ok, outcome.error
        assert outcome.result["output"] == str(output)
        assert outcome.result["bits"] == 4 and outcome.result["group_size"] == 32
        assert (output / "openpto.json").exists()
        assert run_status(tmp_path / "opt.db", outcome.run_id) == ("succeeded", None)
        # The per-layer events reached the chart: one point per decoder layer (2).
        chart = screen.query_one("#layer-chart")
        assert len(chart.errors) == 2 and all(e > 0 for e in chart.errors)
        result = screen.query_one("#result-table", DataTable)
        assert result.get_row_at(0)[0] == "size"

        await pilot.press("f8")
        runs = app.screen.query_one("#rows", DataTable)
        await wait_for(pilot, lambda: runs.row_count > 0, what="the runs table")
        assert outcome.run_id in [key.value for key in runs.rows]

        await pilot.press("f2")
        artifacts = app.screen.query_one("#artifacts", DataTable)
        await wait_for(pilot, lambda: artifacts.row_count > 0, what="the artifacts table")
        assert str(artifacts.get_row_at(0)[0]).endswith("tiny-rtn")


@sync
async def test_cancelling_a_job_leaves_a_failed_run_and_no_artifact(
        tmp_path: Path, tiny_folder: Path, configs: list[dict[str, Any]]) -> None:
    app = app_for(tmp_path, configs)
    output = tmp_path / "never"
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_quantize(app, pilot, tiny_folder, method="gptq")
        # Enough calibration (256 x 256 tokens) that the job is still running when cancelled.
        screen.query_one("#opt-samples", Input).value = "256"
        screen.query_one("#opt-calib-seq-len", Input).value = "256"
        screen.query_one("#opt-output", Input).value = str(output)
        await pilot.press("ctrl+r")
        db = tmp_path / "opt.db"

        def running() -> bool:
            try:
                return sqlite3.connect(db).execute(
                    "SELECT count(*) FROM runs WHERE status = 'running'").fetchone()[0] == 1
            except sqlite3.Error:
                return False

        await wait_for(pilot, running, what="the running run row")
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: screen.last_outcome is not None, what="the job to stop")
        outcome = screen.last_outcome
        assert outcome.cancelled and not outcome.ok
        assert outcome.returncode == 130
        status, error = run_status(db, outcome.run_id)
        assert status == "failed"
        assert error.startswith("KeyboardInterrupt") or "interrupted" in error
        assert not output.exists()
        log = screen.query_one("#job-log", RichLog)
        assert any("run failed" in str(line.text) for line in log.lines)


@sync
async def test_the_form_refuses_a_bad_group_size_with_a_message(
        tmp_path: Path, tiny_folder: Path, configs: list[dict[str, Any]]) -> None:
    app = app_for(tmp_path, configs)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_quantize(app, pilot, tiny_folder, method="gptq")
        screen.query_one("#field-group_size", Input).value = "48"
        await pilot.pause()
        error = screen.query_one("#error-group_size", Label)
        assert "group size 48: one of 32, 64, 128, 'auto' or 'channel'" in str(error.content)
        assert error.has_class("shown")
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert screen.job is None  # nothing started
        messages = [n.message for n in app._notifications]
        assert any("group size 48" in m for m in messages)
        screen.query_one("#field-group_size", Input).value = "64"
        await pilot.pause()
        assert not error.has_class("shown")
        assert "group_size=64" in screen.command_args()


@sync
async def test_settings_survive_a_restart(tmp_path: Path, configs: list[dict[str, Any]]) -> None:
    app = app_for(tmp_path, configs)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f9")
        screen = app.screen
        screen.query_one("#default-model", Input).value = "/models/mine"
        screen.query_one("#default-device", Input).value = "cuda:1"
        screen.query_one("#default-samples", Input).value = "32"
        screen.query_one("#theme", Select).value = "light"
        screen.query_one("#key-job-run", Input).value = "f5"
        await pilot.press("ctrl+s")
        await pilot.pause()
    saved = load(tmp_path / "config.toml")
    assert saved.defaults == {"model": "/models/mine", "device": "cuda:1", "samples": 32}
    assert saved.theme == "light" and saved.keys == {"job.run": "f5"}

    again = app_for(tmp_path, configs)
    async with again.run_test(size=(80, 24)) as pilot:
        assert again.theme == "textual-light"
        await pilot.press("f9")
        assert again.screen.query_one("#default-model", Input).value == "/models/mine"
        await pilot.press("f3")
        assert again.screen.query_one("#model").value == "/models/mine"
        assert again.screen.query_one("#opt-device", Input).value == "cuda:1"
        assert again.screen.query_one("#opt-samples", Input).value == "32"


@sync
async def test_a_bad_samples_value_is_not_saved(tmp_path: Path,
                                                configs: list[dict[str, Any]]) -> None:
    app = app_for(tmp_path, configs)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f9")
        app.screen.query_one("#default-samples", Input).value = "many"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert any("not a positive whole number" in n.message for n in app._notifications)
    assert not (tmp_path / "config.toml").exists()


@sync
async def test_the_theme_toggles(tmp_path: Path, configs: list[dict[str, Any]]) -> None:
    app = app_for(tmp_path, configs, theme="dark")
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.theme == "textual-dark"
        await pilot.press("ctrl+t")
        assert app.theme == "textual-light"
        await pilot.press("ctrl+t")
        assert app.theme == "textual-dark"


@sync
async def test_help_and_the_command_palette_list_every_screen(
        tmp_path: Path, configs: list[dict[str, Any]]) -> None:
    app = app_for(tmp_path, configs)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f3")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for screen in ("Home", "Quantize", "Sparsify", "Evaluate / Profile / Bench", "Serve",
                       "Agent", "Runs / Datasette", "Settings"):
            assert f"Go to {screen}" in titles
        for action in ("Run", "Size preview", "Cancel job", "Browse model"):
            assert f"Quantize: {action}" in titles
        await pilot.press("f1")
        assert type(app.screen).__name__ == "HelpScreen"
        assert "| ctrl+r | Run |" in app.help_text() or "ctrl+r" in app.screen.text
        await pilot.press("escape")
        assert type(app.screen).__name__ == "QuantizeScreen"


@sync
async def test_the_serve_screen_starts_and_stops_a_real_server(
        tmp_path: Path, tiny_folder: Path, configs: list[dict[str, Any]]) -> None:
    app = app_for(tmp_path, configs)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f6")
        screen = app.screen
        screen.query_one("#serve-model").value = str(tiny_folder)
        screen.query_one("#api-key", Input).value = "s3cret"
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: screen.url is not None, timeout=180, what="the server")
        url = screen.url
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key protects it
        # The chat box talks to it through the same key.
        chat = screen.query_one("#chat", Input)
        chat.value = "hello"
        await chat.action_submit()
        log = screen.query_one("#chat-log", RichLog)
        await wait_for(pilot, lambda: any("model:" in str(line.text) for line in log.lines),
                       what=f"the reply ({[n.message for n in app._notifications]})")
        metrics = screen.query_one("#serve-metrics", Label)
        await wait_for(pilot, lambda: "tokens generated" in str(metrics.content)
                       and "tokens generated 0 " not in str(metrics.content),
                       what="the metrics")
        process = screen.process
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: screen.process is None and process.returncode is not None,
                       what="the server to stop")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)



@sync
async def test_the_agent_streams_and_asks_before_a_writing_tool(
        tmp_path: Path, tiny_folder: Path, configs: list[dict[str, Any]]) -> None:
    """The agent (a child process) against the Serve screen's server of the tiny model: a forced
    ``quantize`` call asks first in a modal dialog; saying no runs nothing."""
    pytest.importorskip("agents")
    pytest.importorskip("llguidance")
    app = app_for(tmp_path, configs)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f6")
        serve = app.screen
        serve.query_one("#serve-model").value = str(tiny_folder)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: serve.url is not None, timeout=180, what="the server")
        await pilot.press("f7")
        agent = app.screen
        agent.query_one("#agent-tools", Input).value = "quantize"
        agent.query_one("#tool-choice", Input).value = "quantize"
        prompt = agent.query_one("#prompt", Input)
        prompt.value = "quantize the model"
        await prompt.action_submit()
        await wait_for(pilot, lambda: type(app.screen).__name__ == "Confirm", timeout=180,
                       what=f"the confirmation ({[n.message for n in app._notifications]})")
        assert "quantize" in app.screen.question
        await pilot.press("n")
        log = agent.query_one("#agent-log", RichLog)
        await wait_for(pilot, lambda: agent.session is not None, timeout=180,
                       what=f"the result ({[n.message for n in app._notifications]})")
        lines = [str(line.text) for line in log.lines]
        assert any(line.startswith("→ quantize") for line in lines)
        assert any(line.startswith("← quantize") for line in lines)  # refused, reported back
        assert not (tmp_path / "opt.db").exists() or sqlite3.connect(tmp_path / "opt.db").execute(
            "SELECT count(*) FROM runs WHERE kind = 'quantize'").fetchone()[0] == 0
        await serve.stop_server()

LEAN_CODE = """
import json, sys
from openpto.tui.app import make_app
app = make_app(db_path=sys.argv[1], config_file=None)
async def visit(pilot):
    for key in ("f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f1"):
        await pilot.press(key)
        await pilot.pause(0.2)
    print(json.dumps(sorted(m for m in ("torch", "transformers", "fastapi", "agents")
                            if m in sys.modules)), flush=True)
    app.exit()
app.run(headless=True, size=(80, 24), auto_pilot=visit)
"""


def test_the_ui_process_never_imports_torch(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LEAN_CODE, str(tmp_path / "opt.db")],
                         capture_output=True, text=True, timeout=180, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@sync
async def test_the_runs_screen_filters_sorts_and_starts_datasette(
        tmp_path: Path, configs: list[dict[str, Any]]) -> None:
    pytest.importorskip("datasette")
    from openpto.store import Store

    store = Store(tmp_path / "opt.db")
    for i, kind in enumerate(("eval", "quantize", "eval")):
        store.insert("runs", {"id": f"run{i}", "kind": kind, "status": "succeeded",
                              "model": f"m{i}", "config": {}, "started_at": f"2026-01-0{i + 1}"})
    app = app_for(tmp_path, configs)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f8")
        screen = app.screen
        rows = screen.query_one("#rows", DataTable)
        await wait_for(pilot, lambda: rows.row_count == 3, what="the runs")
        assert [key.value for key in rows.rows] == ["run2", "run1", "run0"]  # newest first
        screen.query_one("#filter", Input).value = "quantize"
        await wait_for(pilot, lambda: rows.row_count == 1, what="the filter")
        assert rows.get_row_at(0)[0] == "run1"
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: screen.datasette_url is not None, timeout=120,
                       what="Datasette")
        page = httpx.get(f"{screen.datasette_url}opt/runs.json?_shape=array", timeout=10)
        assert {r["id"] for r in page.json()} == {"run0", "run1", "run2"}
        await screen.stop_datasette()


def test_opt_tui_has_help_with_an_example_and_refuses_a_bad_theme(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import run_opt

    code, out, _ = run_opt(["tui", "--help"], capsys, monkeypatch)
    assert code == 0 and "Example: opt tui --theme light" in out
    code, _, err = run_opt(["tui", "--theme", "blue"], capsys, monkeypatch)
    assert code == 2 and err.strip() == "error: --theme 'blue': choose dark or light"
